"""Eval throughput and search-trial cost on a device, against a bare forward loop on the same model and windows.

- eval: ``evaluate_model`` (masked per-window losses, token and byte counts, standard error) vs a bare
  ``model(x).logits`` loop over the same windows and batch size, both in ``--dtype`` on ``--device``.
  Reported: tokens/s of each and their ratio.
- search trial: one ``MergeObjective`` call (the fp32 weighted sum of ``--checkpoints`` checkpoints,
  built on the device, copied into the one resident model, then the evaluation) vs the bare forward loop.
  Reported: seconds per trial, the part spent merging and loading, and trial / bare.

The model is a GPT-2 of ``--n-embd`` x ``--layers`` with random weights (timings do not depend on the
values); the data is random token ids in a ``.npy`` (no tokenizer needed). Runs alternate in ABBA
order and medians are reported.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_device.py --device cuda --dtype bfloat16
    PYTHONPATH=src .venv/bin/python benchmarks/bench_device.py --device cpu --n-embd 128 --layers 2 --windows 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckptmerge.evaluation.devices import resolve_device, resolve_dtype
from ckptmerge.evaluation.evaluator import evaluate_model
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.merging.discover import discover
from ckptmerge.search.objective import MergeObjective


def make_run(root: Path, args) -> tuple[Path, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.n_embd, n_layer=args.layers,
                        n_head=max(1, args.n_embd // 64))
    model = GPT2LMHeadModel(config)
    for i in range(args.checkpoints):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / "run" / f"checkpoint-{100 * (i + 1)}")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, args.vocab, args.windows * args.context + 1, dtype=np.int32))
    return root / "run", tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model, windows, batch: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in windows.split(batch):
            model(rows[:, :-1].to(device)).logits
    sync(device)
    return time.perf_counter() - start


def ours_eval(model, windows, batch: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    evaluate_model(model, windows, batch_size=batch)
    sync(device)
    return time.perf_counter() - start


def trial(objective: MergeObjective, coeffs, data: str, device) -> tuple[float, float]:
    """(seconds for the whole trial, seconds for merge + load alone)."""
    sync(device)
    start = time.perf_counter()
    objective.scorer.load(objective.refs, coeffs)
    sync(device)
    merge_s = time.perf_counter() - start
    start = time.perf_counter()
    objective(coeffs, data)  # a whole trial: the weighted sum, the copy into the model, the evaluation
    sync(device)
    return time.perf_counter() - start, merge_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        run, tokens = make_run(Path(tmp), args)
        settings = EvalSettings(device=str(device), dtype=args.dtype, batch_size=args.batch, progress=False)
        objective = MergeObjective(discover(run).checkpoints, n_tokens=args.windows * args.context, settings=settings)
        windows = objective.windows(str(tokens))
        model = objective.model
        n_tokens = windows.shape[0] * (windows.shape[1] - 1)
        params = sum(p.numel() for p in model.parameters())
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device {device} ({name}), dtype {dtype}, GPT-2 {params / 1e6:.1f}M params, "
              f"{n_tokens:,} tokens in {windows.shape[0]} windows of {windows.shape[1] - 1}, batch {args.batch}")
        bare_forward(model, windows, args.batch, device)  # warm-up (kernels, allocator)
        bare, ours, trials, merges = [], [], [], []
        coeffs = [1.0 / args.checkpoints] * args.checkpoints
        for r in range(args.repeats):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    bare.append(bare_forward(model, windows, args.batch, device))
                else:
                    ours.append(ours_eval(model, windows, args.batch, device))
            total, merge_s = trial(objective, coeffs, str(tokens), device)
            trials.append(total)
            merges.append(merge_s)
        b, o, t, m = (statistics.median(x) for x in (bare, ours, trials, merges))
        print(f"eval: bare forward {n_tokens / b:,.0f} tokens/s, evaluate_model {n_tokens / o:,.0f} tokens/s, "
              f"ratio {b / o:.3f} (1.0 = as fast as the bare loop)")
        print(f"search trial: {t:.3f} s ({m:.3f} s merging {args.checkpoints} checkpoints and loading), "
              f"bare forward over the same windows {b:.3f} s; trial / bare = {t / b:.2f}")


if __name__ == "__main__":
    main()
