#!/usr/bin/env bash
# The demo: set up .venv, write a checkpoint series, inspect it, merge it three ways, score the merges.
# Interim version: the series is synthetic (examples/synthetic_run.py) until the trainer lands.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
run=runs/synthetic
out=out/demo
rm -rf "$run" "$run-center.pt" "$out"
mkdir -p runs out
echo "== writing a synthetic 20-checkpoint series of a tiny Llama to $run"
python examples/synthetic_run.py "$run" --checkpoints 20 --save-every 100
ckptmerge inspect "$run"
echo "== plan of an EMA merge (no tensors read)"
ckptmerge merge "$run" -o "$out/ema" --schedule ema --alpha 0.2 --last 10 --every 100 --dry-run
for spec in "sma" "wma" "ema --alpha 0.2"; do
  name="${spec%% *}"
  ckptmerge merge "$run" -o "$out/$name" --schedule $spec --last 10 --every 100 --quiet
done
echo "== distance of each model to the series' center (lower is better)"
python examples/synthetic_run.py --score "$run" "$run/step-002000" "$out/sma" "$out/wma" "$out/ema"
