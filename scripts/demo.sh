#!/usr/bin/env bash
# The demo: set up .venv, then train a tiny LM (constant LR + an anneal branch), merge its last
# checkpoints (SMA / WMA / EMA), evaluate on five held-out domains, and write a report and plot.
# Extra arguments go to `ckptmerge demo` (e.g. --quick, -o DIR).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/ckptmerge demo "$@"
