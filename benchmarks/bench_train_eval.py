"""Throughput of ckptmerge's evaluator and trainer against bare loops on the same model, side by side.

- eval: ``evaluate_model`` (loss per window, standard error) vs a bare ``model(x)`` forward loop over
  the same windows and batch size. Target: at least 95% of the bare tokens/s.
- train: ``ckptmerge.train.trainer.train`` (schedule, clipping, metrics, one checkpoint at the end)
  vs a minimal nanoGPT-style loop (random batches, forward, backward, clip, AdamW step) on the same
  preset, batch and context. Target: at least 90% of the minimal loop's tokens/s.

Runs alternate in ABBA order (so neither side always goes first) and the median of each is reported,
since these machines are noisy.

    .venv/bin/python benchmarks/bench_train_eval.py --presets tiny small --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.evaluator import evaluate_model
from ckptmerge.train.presets import build_model, count_parameters, preset_context
from ckptmerge.train.trainer import TrainConfig, train

BATCH = 16


def bare_forward(model, windows) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.split(BATCH):
            model(input_ids=batch[:, :-1]).logits
    return windows.shape[0] * (windows.shape[1] - 1) / (time.perf_counter() - start)


def ours_eval(model, windows) -> float:
    start = time.perf_counter()
    evaluate_model(model, windows, batch_size=BATCH)
    return windows.shape[0] * (windows.shape[1] - 1) / (time.perf_counter() - start)


def minimal_train(preset: str, steps: int, tokens: np.ndarray) -> float:
    context = preset_context(preset)
    model = build_model(preset, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(tokens.astype(np.int64))
    start = time.perf_counter()
    for _ in range(steps):
        ix = torch.randint(len(data) - context - 1, (BATCH,))
        x = torch.stack([data[i:i + context] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + context] for i in ix])
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * context / (time.perf_counter() - start)


def ours_train(preset: str, steps: int) -> float:
    config = TrainConfig(preset=preset, steps=steps, batch_size=BATCH, save_every=steps, log_every=10, warmup_steps=10)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(config, Path(tmp) / "run", progress=False)
        return steps * config.tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--only", choices=("eval", "train"), help="run one half only")
    args = p.parse_args()
    tokens = np.asarray(load_tokens("shakespeare"))
    val = load_tokens("shakespeare-val")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}\n")
    print("| preset | params | what | ckptmerge tok/s | bare loop tok/s | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        model = build_model(preset, seed=0).eval()
        windows = eval_windows(val, n_tokens=args.eval_tokens, context=preset_context(preset))
        bare_forward(model, windows[:BATCH])  # warm-up
        if args.only != "train":
            ours, bare = _abba(lambda: ours_eval(model, windows), lambda: bare_forward(model, windows), args.repeats)
            _row(preset, count_parameters(model), "eval", ours, bare, 0.95)
        if args.only != "eval":
            ours, bare = _abba(lambda: ours_train(preset, args.train_steps),
                               lambda: minimal_train(preset, args.train_steps, tokens), args.repeats)
            _row(preset, count_parameters(model), "train", ours, bare, 0.90)


def _abba(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Run a and b ``repeats`` times each, alternating which goes first."""
    xs, ys = [], []
    for i in range(repeats):
        if i % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def _row(preset, params, what, ours, bare, target) -> None:
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"| {preset} | {params / 1e6:.2f}M | {what} | {o:,.0f} | {b:,.0f} | {o / b:.3f} | >= {target:.2f} |", flush=True)


if __name__ == "__main__":
    main()
