"""Predicted wall time and per-rank memory of a distributed merge of 7B / 70B Llama checkpoints on many ranks.

    python scripts/predict_scale.py --measured benchmarks/_work/dist/result.json

The model (every assumption is a flag, printed above the table):
- Inputs are fp32 HF checkpoints (4 bytes per parameter), the output fp32; every input byte is read once.
- A rank merges at ``min(rank_compute_GBps, rank_read_GBps)``: the first is measured (the per-rank read
  throughput of the warm-cache merge in bench_distributed.py: the engine's fp32 accumulate), the second is
  a stated per-rank share of the filesystem. The job reads at most ``fs_read_GBps`` in aggregate and
  writes at most ``fs_write_GBps`` (``rank_write_GBps`` per rank).
- Ranks get whole tensors (merging/distributed.py: split_plan), so the busiest rank's share is computed
  with the repository's own split (parallel/split.py) on the real tensor list; past a few hundred ranks the
  largest tensor (the embedding) bounds the time.
- Per-rank memory is the engine's: one fp32 accumulator chunk plus one output chunk of at most
  ``chunk_MB`` each (row slices of larger tensors), whatever the model size or N; input pages are
  memory-mapped page cache (reclaimable), not counted.
- Launch, rendezvous, plan (headers only) and the rename are left out (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ckptmerge.parallel.split import split_by_cost  # noqa: E402

MODELS = {  # hidden, ffn, layers, vocab, kv_dim (GQA), untied embeddings
    "7B": (4096, 11008, 32, 32000, 4096),
    "70B": (8192, 28672, 80, 32000, 1024),
}


def tensor_params(name: str) -> list[int]:
    hidden, ffn, layers, vocab, kv = MODELS[name]
    per_layer = [hidden * hidden, hidden * kv, hidden * kv, hidden * hidden, ffn * hidden, ffn * hidden,
                 hidden * ffn, hidden, hidden]
    return [vocab * hidden] + per_layer * layers + [hidden, vocab * hidden]


def predict(model: str, n: int, ranks: int, args) -> tuple[float, float]:
    """(seconds, per-rank MB) for merging ``n`` fp32 checkpoints of ``model`` on ``ranks`` ranks."""
    read_bytes = [4 * p * n for p in tensor_params(model)]
    busiest = max(sum(read_bytes[i] for i in r) for r in split_by_cost(read_bytes, ranks))
    rank_GBps = min(args.rank_compute_GBps, args.rank_read_GBps)
    read_s = max(busiest / (rank_GBps * 1e9), sum(read_bytes) / (args.fs_read_GBps * 1e9))
    out_bytes = 4 * sum(tensor_params(model))
    write_s = out_bytes / (min(ranks * args.rank_write_GBps, args.fs_write_GBps) * 1e9)
    largest_MB = 4 * max(tensor_params(model)) / 1e6
    memory_MB = 2 * min(args.chunk_MB, largest_MB)
    return read_s + write_s, memory_MB


def measured_compute(path: str | None, default: float) -> float:
    if not path:
        return default
    merges = json.loads(Path(path).read_text())["merge"]["1"]
    return max(max(m["per_rank_GBps"]) for m in merges)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measured", help="bench_distributed.py --json output (sets --rank-compute-GBps)")
    p.add_argument("--rank-compute-GBps", type=float, default=1.0, help="fp32 merge rate of one rank, cache-warm")
    p.add_argument("--rank-read-GBps", type=float, default=2.0, help="filesystem read bandwidth one rank gets")
    p.add_argument("--fs-read-GBps", type=float, default=200.0, help="aggregate read bandwidth of the filesystem")
    p.add_argument("--rank-write-GBps", type=float, default=1.0)
    p.add_argument("--fs-write-GBps", type=float, default=100.0)
    p.add_argument("--chunk-MB", type=float, default=268.4, help="engine chunk (default 256 MiB)")
    args = p.parse_args()
    args.rank_compute_GBps = measured_compute(args.measured, args.rank_compute_GBps)
    print(f"assumptions: fp32 inputs and output; per rank min({args.rank_compute_GBps:.2f} GB/s merge compute "
          f"{'(measured)' if args.measured else '(stated)'}, {args.rank_read_GBps} GB/s read); filesystem "
          f"{args.fs_read_GBps} GB/s read, {args.fs_write_GBps} GB/s write in aggregate; "
          f"{args.rank_write_GBps} GB/s write per rank; whole tensors per rank\n")
    ranks = (1, 8, 64, 256)
    print("| model | checkpoints | read | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}" for r in ranks)
          + " | memory per rank |")
    print("|---|---|---|" + "---|" * len(ranks) + "---|")
    for model in MODELS:
        for n in (10, 100):
            total_TB = 4 * sum(tensor_params(model)) * n / 1e12
            cells = []
            for r in ranks:
                seconds, memory_MB = predict(model, n, r, args)
                cells.append(f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
            print(f"| {model} | {n} | {total_TB:.2f} TB | " + " | ".join(cells) + f" | {memory_MB:.0f} MB |")


if __name__ == "__main__":
    main()
