#!/usr/bin/env bash
# Create or refresh .venv at the repository root with ckptmerge and its test tools.
# Idempotent: reinstalls only when pyproject.toml changed. Usable with CUDA builds of torch:
# if the venv already has torch, it is kept; otherwise torch==2.13.0 is installed (on these
# machines the CPU build from local disk).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.ckptmerge-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
pip_quiet() {  # pip, minus the warnings about this machine's unused local index paths
  .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up .venv (first run: a minute or two)" >&2
  .venv/bin/python -c "import torch" 2>/dev/null || pip_quiet install -q "torch==2.13.0"
  pip_quiet install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
