"""Data-parallel evaluation on many ranks (torchrun): each rank scores a contiguous block of the windows.

    torchrun --nproc-per-node 4 -m ckptmerge eval out/ema --data shakespeare-val

Every rank holds the whole model and the same windows; rank r evaluates block r of
``torch.tensor_split(windows, world_size)`` with ``evaluate_model``, and the per-window losses are
all-gathered back into window order. The mean, the standard error over windows and any paired
difference are then computed from the same per-window losses as on one rank (equal to within float
rounding of the batched forward passes). An early-stopping rule (``stop``, search pruning) is replayed on
the gathered losses batch by batch, so a trial stops where it would have on one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ckptmerge.evaluation.evaluator import EvalResult, evaluate_model, rows_per_batch, summarize
from ckptmerge.parallel.world import all_gather, is_distributed, rank, world_size


def evaluate_sharded(model: torch.nn.Module, windows: torch.Tensor, *, data: str = "", batch_size: int = 16,
                     stop: Callable[[float, int], bool] | None = None, **options) -> EvalResult:
    """``evaluate_model`` over all ranks of the job (a single process: exactly ``evaluate_model``).

    ``options`` go to ``evaluate_model`` unchanged (bf16, byte_lengths, max_batch_tokens, tokens_requested).
    """
    if not is_distributed():
        return evaluate_model(model, windows, data=data, batch_size=batch_size, stop=stop, **options)
    block = torch.tensor_split(windows, world_size())[rank()]
    mine = evaluate_model(model, block, data=data, batch_size=batch_size, **options) if len(block) else None
    parts = all_gather(None if mine is None else (mine.window_losses, mine.window_tokens, mine.bytes))
    parts = [part for part in parts if part is not None]
    losses = np.asarray([x for part in parts for x in part[0]], dtype=np.float64)
    tokens = np.asarray([x for part in parts for x in part[1]], dtype=np.float64)
    n_bytes = sum(part[2] for part in parts)
    if stop is not None:
        rows = rows_per_batch(batch_size, options.get("max_batch_tokens"), windows.shape[1] - 1)
        kept = _replay_stop(losses, tokens, rows, stop)
        if kept < len(losses):  # bytes are per window only on one rank: count those of the kept windows
            losses, tokens = losses[:kept], tokens[:kept]
            n_bytes = 0
    return summarize(data, losses, tokens, n_bytes=n_bytes, tokens_requested=options.get("tokens_requested"))


def _replay_stop(losses: np.ndarray, tokens: np.ndarray, rows: int, stop: Callable[[float, int], bool]) -> int:
    """How many windows one rank would have scored before ``stop`` said so, batch by batch."""
    for batches in range(1, -(-len(losses) // rows) + 1):
        head = slice(0, batches * rows)
        if stop(float((losses[head] * tokens[head]).sum() / tokens[head].sum()), batches):
            return min(batches * rows, len(losses))
    return len(losses)
