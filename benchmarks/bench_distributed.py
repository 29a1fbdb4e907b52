"""Distributed benchmark: merge throughput and eval windows/s with 1 and 2 ranks, side by side in one run.

Writes N fp32 checkpoints of a Llama-shaped model (``--layers`` decoder layers, hidden 1024, as in
bench_merge.py) into benchmarks/_work/dist/, then merges them with one process and with
``torchrun --nproc-per-node 2`` (gloo), warm page cache, ``--repeats`` times each, alternating. The time
compared is the merge phase recorded in merge.json (``stats.merge_seconds``: streaming + writing, without
the launcher's and Python's start-up); per-rank read throughput is ``bytes_read / seconds`` of each rank.
Then a tiny Llama is evaluated on the same windows with 1 and 2 ranks (windows/s of the scoring, timed
inside the job). Prints a markdown table and writes ``--json``; ``scripts/predict_scale.py`` reads it.

    .venv/bin/python benchmarks/bench_distributed.py --n 4 --layers 8 --json benchmarks/_work/dist/result.json

On a machine with 2 cores both ranks share the cores and the disk; the ratio shows the overhead of
splitting, not the speed-up of ranks on separate nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import llama_shapes  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "dist"
SRC = str(Path(__file__).resolve().parents[1] / "src")
EVAL_SCRIPT = """
import json, sys, time
import torch
from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import load_model
from ckptmerge.parallel.world import barrier, rank, world_size
model = load_model(sys.argv[1])
windows = eval_windows(load_tokens(sys.argv[2]), n_tokens=int(sys.argv[3]), context=64)
evaluate_sharded(model, windows[: 4 * world_size()])  # warm-up
barrier()
start = time.perf_counter()
result = evaluate_sharded(model, windows, batch_size=8)
seconds = time.perf_counter() - start
if rank() == 0:
    print(json.dumps({"windows": len(windows), "seconds": seconds, "loss": result.loss}))
"""


def write_series(n: int, layers: int) -> Path:
    from safetensors.torch import save_file

    run = WORK / f"run-n{n}-l{layers}"
    if run.exists():
        return run
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {k: torch.randn(s, generator=g) for k, s in llama_shapes(layers).items()}
        folder = run / f"step-{(i + 1) * 100:06d}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return run


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}


def merge_once(run: Path, ranks: int) -> dict:
    out = WORK / f"out-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["-m", "ckptmerge", "merge", str(run), "-o", str(out), "--schedule", "sma", "--hash", "none", "--quiet"]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(ranks)]
    subprocess.run(launcher + args, check=True, env=env(), capture_output=True)
    stats = json.loads((out / "merge.json").read_text())["stats"]
    per_rank = stats.get("ranks") or [{"rank": 0, "bytes_read": stats["bytes_read"], "seconds": stats["merge_seconds"]}]
    return {"merge_seconds": stats["merge_seconds"], "bytes_read": stats["bytes_read"],
            "per_rank_GBps": [r["bytes_read"] / r["seconds"] / 1e9 for r in per_rank]}


def eval_once(model: Path, data: Path, tokens: int, ranks: int) -> dict:
    script = WORK / "eval_bench.py"
    script.write_text(EVAL_SCRIPT)
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(ranks)]
    proc = subprocess.run(launcher + [str(script), str(model), str(data), str(tokens)], check=True, env=env(),
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_model() -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, data = WORK / "tiny-llama", WORK / "eval.txt"
    if not folder.exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4,
                                     max_position_embeddings=128)).save_pretrained(folder)
        data.write_text(" ".join(["to be or not to be that is the question"] * 4000))
    return folder, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="checkpoints merged")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--json", help="write the measurements here (input of scripts/predict_scale.py)")
    args = parser.parse_args()
    os.environ["CKPTMERGE_CACHE"] = str(WORK / "cache")
    run = write_series(args.n, args.layers)
    merges = {1: [], 2: []}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            merges[ranks].append(merge_once(run, ranks))
    model, data = tiny_model()
    evals = {ranks: [eval_once(model, data, args.eval_tokens, ranks) for _ in range(args.repeats)] for ranks in (1, 2)}
    best = {r: min(m, key=lambda x: x["merge_seconds"]) for r, m in merges.items()}
    best_eval = {r: min(e, key=lambda x: x["seconds"]) for r, e in evals.items()}
    gb = best[1]["bytes_read"] / 1e9
    print(f"merge: {args.n} checkpoints x {gb / args.n:.2f} GB fp32, best of {args.repeats}, warm page cache, "
          f"{os.cpu_count()} cores\n")
    print("| ranks | merge s | GB/s (job) | GB/s per rank | eval windows/s |\n|---|---|---|---|---|")
    for r in (1, 2):
        wps = best_eval[r]["windows"] / best_eval[r]["seconds"]
        print(f"| {r} | {best[r]['merge_seconds']:.2f} | {gb / best[r]['merge_seconds']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in best[r]['per_rank_GBps'])} | {wps:.1f} |")
    print(f"\nmerge speed-up 2 vs 1 rank: {best[1]['merge_seconds'] / best[2]['merge_seconds']:.2f}x; eval speed-up: "
          f"{best_eval[1]['seconds'] / best_eval[2]['seconds']:.2f}x; eval loss 1 vs 2 ranks: "
          f"{best_eval[1]['loss']:.8f} vs {best_eval[2]['loss']:.8f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "n": args.n, "gb_read": gb,
                                               "merge": {str(k): v for k, v in merges.items()},
                                               "eval": {str(k): v for k, v in evals.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
