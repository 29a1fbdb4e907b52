"""Data-parallel evaluation on many ranks (torchrun): each rank scores a contiguous block of the windows.

    torchrun --nproc-per-node 4 -m ckptmerge eval out/ema --data shakespeare-val

Every rank holds the whole model and the same windows; rank r evaluates block r of
``torch.tensor_split(windows, world_size)`` with ``evaluate_model``, and the per-window losses are
all-gathered back into window order, with each window's token count (a short last window weighs less). The mean, the standard error over windows and any paired
difference are then computed from the same per-window losses as on one rank (equal to within float
rounding of the batched forward passes). An early-stopping rule (``stop``, search pruning) is replayed on
the gathered losses batch by batch, so a trial stops where it would have on one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ckptmerge.evaluation.evaluator import EvalResult, count_bytes, evaluate_model, rows_per_batch, summarize
from ckptmerge.parallel.world import all_gather, is_distributed, rank, world_size


def evaluate_sharded(model: torch.nn.Module, windows: torch.Tensor, *, data: str = "", batch_size: int = 16,
                     bf16: bool = False, stop: Callable[[float, int], bool] | None = None,
                     byte_lengths: np.ndarray | None = None, max_batch_tokens: int | None = None,
                     tokens_requested: int | None = None) -> EvalResult:
    """``evaluate_model`` over all ranks of the job (a single process: exactly ``evaluate_model``)."""
    options = {"byte_lengths": byte_lengths, "max_batch_tokens": max_batch_tokens, "tokens_requested": tokens_requested}
    if not is_distributed():
        return evaluate_model(model, windows, data=data, batch_size=batch_size, bf16=bf16, stop=stop, **options)
    block = torch.tensor_split(windows, world_size())[rank()]
    mine = evaluate_model(model, block, data=data, batch_size=batch_size, bf16=bf16, **options) if len(block) else None
    parts = all_gather((mine.window_losses, mine.window_tokens) if mine else ([], []))
    losses = np.asarray([x for part, _ in parts for x in part], dtype=np.float64)
    tokens = np.asarray([x for _, part in parts for x in part], dtype=np.int64)
    if stop is not None:
        rows = rows_per_batch(batch_size, max_batch_tokens, windows.shape[1] - 1)
        losses, tokens = _replay_stop(losses, tokens, rows, stop)
    n_bytes = count_bytes(windows[:len(losses), 1:], byte_lengths) if byte_lengths is not None else 0
    return summarize(data, losses, tokens, n_bytes=n_bytes, tokens_requested=tokens_requested)


def _replay_stop(losses: np.ndarray, tokens: np.ndarray, rows: int,
                 stop: Callable[[float, int], bool]) -> tuple[np.ndarray, np.ndarray]:
    """The windows one rank would have scored before ``stop`` said so, batch by batch."""
    for batches in range(1, -(-len(losses) // rows) + 1):
        head, weights = losses[:batches * rows], tokens[:batches * rows]
        if stop(float((head * weights).sum() / weights.sum()), batches):
            return head, weights
    return losses, tokens
