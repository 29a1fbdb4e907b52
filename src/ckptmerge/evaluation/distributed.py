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

from ckptmerge.evaluation.evaluator import EvalResult, evaluate_model, summarize
from ckptmerge.parallel.world import all_gather, is_distributed, rank, world_size


def evaluate_sharded(model: torch.nn.Module, windows: torch.Tensor, *, data: str = "", batch_size: int = 16,
                     bf16: bool = False, stop: Callable[[float, int], bool] | None = None) -> EvalResult:
    """``evaluate_model`` over all ranks of the job (a single process: exactly ``evaluate_model``)."""
    if not is_distributed():
        return evaluate_model(model, windows, data=data, batch_size=batch_size, bf16=bf16, stop=stop)
    block = torch.tensor_split(windows, world_size())[rank()]
    mine = (evaluate_model(model, block, data=data, batch_size=batch_size, bf16=bf16).window_losses
            if len(block) else [])
    losses = np.asarray([x for part in all_gather(mine) for x in part], dtype=np.float64)
    if stop is not None:
        losses = _replay_stop(losses, batch_size, stop)
    return summarize(data, losses, tokens=len(losses) * (windows.shape[1] - 1))


def _replay_stop(losses: np.ndarray, batch_size: int, stop: Callable[[float, int], bool]) -> np.ndarray:
    """The windows one rank would have scored before ``stop`` said so, batch by batch."""
    for batches in range(1, -(-len(losses) // batch_size) + 1):
        head = losses[:batches * batch_size]
        if stop(float(head.mean()), batches):
            return head
    return losses
