"""Peak memory of ``ckptmerge watch`` with three methods, for two model sizes side by side in one run.

For each size it writes N fp32 checkpoints of a stack of square layers (HF folders), runs
``ckptmerge watch RUN -o OUT --method sma:n=3 --method ema:alpha=0.3 --method minus_sqrt:n=4 --once`` in a
child process, and samples the child's ``RssAnon`` (anonymous memory: page-cache and mapped file pages do
not count) every 10 ms. The bound is the merge engine's: 3 x the largest tensor + 500 MB. The table gives
the peak, the bound, peak / model size (a watch that kept the model in RAM, as watch did before, needs at
least 1.0x) and the ratio of the two sizes' peaks.

    .venv/bin/python benchmarks/bench_watch_memory.py                       # 40 MB and 400 MB models, N = 5
    .venv/bin/python benchmarks/bench_watch_memory.py --sizes-mb 20 200 --n 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sma:n=3", "ema:alpha=0.3", "minus_sqrt:n=4"]
LAYER_MB = 16  # each layer a 2048 x 2048 fp32 matrix


def write_run(run: Path, size_mb: int, n: int) -> int:
    """N checkpoints of ``size_mb`` MB; returns the largest tensor's bytes."""
    side = 2048
    layers = max(1, size_mb // LAYER_MB)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        state = {f"layers.{k}.weight": torch.randn(side, side, generator=g) for k in range(layers)}
        folder = run / f"step-{100 * (i + 1):06d}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors")
        old = time.time() - 60
        os.utime(folder / "model.safetensors", (old, old))
    return side * side * 4


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_watch_rss(run: Path, out: Path) -> tuple[float, float]:
    """(peak RssAnon in MB, seconds) of one ``watch --once`` over ``run``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "ckptmerge", "watch", str(run), "-o", str(out), "--settle-s", "1", "--once",
           *sum((["--method", m] for m in METHODS), [])]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon_kb(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"watch failed: {err[-2000:]}")
    return peak[0] / 1000, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[40, 400])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "_work" / "watch-memory"))
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for size_mb in args.sizes_mb:
        shutil.rmtree(work, ignore_errors=True)
        largest = write_run(work / "run", size_mb, args.n)
        model_mb = max(1, size_mb // LAYER_MB) * largest / 1e6
        peak_mb, seconds = peak_watch_rss(work / "run", work / "out")
        bound_mb = 3 * largest / 1e6 + 500
        rows.append((model_mb, largest / 1e6, peak_mb, bound_mb, seconds))
    shutil.rmtree(work, ignore_errors=True)
    print(f"watch --once, {len(METHODS)} methods ({', '.join(METHODS)}), N = {args.n} checkpoints")
    print("| model MB | largest tensor MB | peak RssAnon MB | bound MB | peak / bound | peak / model | seconds |")
    print("|---|---|---|---|---|---|---|")
    for model_mb, largest_mb, peak_mb, bound_mb, seconds in rows:
        print(f"| {model_mb:.0f} | {largest_mb:.1f} | {peak_mb:.0f} | {bound_mb:.0f} | {peak_mb / bound_mb:.2f} | "
              f"{peak_mb / model_mb:.2f} | {seconds:.1f} |")
    print(f"peak ratio, {rows[1][0] / rows[0][0]:.0f}x the model: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
