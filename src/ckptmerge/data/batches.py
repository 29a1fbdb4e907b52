"""Deterministic token windows: training batches as a pure function of (seed, step), eval windows fixed.

Training batches are drawn from a generator seeded by (seed, step, micro-step), so a resumed
run sees exactly the batches it would have seen, with no sampler state to save. Evaluation
windows are evenly spaced over the token file and identical for every model compared.
"""

from __future__ import annotations

import numpy as np
import torch

from ckptmerge.errors import DataError


def train_batch(tokens: np.ndarray, *, seed: int, step: int, micro: int, batch_size: int,
                context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each ``(batch_size, context)`` int64."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    windows = np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


PAD = -100  # fills the end of a short last window; never an input the model sees, never a scored target


def eval_windows(tokens: np.ndarray, *, n_tokens: int, context: int) -> torch.Tensor:
    """``(n_windows, context + 1)`` windows whose scored tokens never overlap.

    With enough data, ``n_tokens // context`` windows evenly spaced over the file. When the file is too
    short for that, the windows tile it instead (stride ``context``): every token after the first is
    scored exactly once, the last window padded with ``PAD``, and the true count is what gets reported.
    """
    n_windows = max(1, n_tokens // context)
    total = len(tokens)
    if total < 2:
        raise DataError(f"the data holds {total} token(s); at least 2 are needed to score one")
    last_start = total - context - 1
    if last_start >= 0:
        starts = np.linspace(0, last_start, n_windows).round().astype(np.int64)
        if n_windows == 1 or int(np.diff(starts).min()) >= context:
            return _stack(tokens, starts, context)
    slots = (total - 1) // context  # full, disjoint windows
    if n_windows <= slots:
        return _stack(tokens, np.floor(np.linspace(0, slots - 1, n_windows) + 0.5).astype(np.int64) * context, context)
    return _stack(tokens, np.arange(0, total - 1, context, dtype=np.int64), context)


def planned_tokens(n_tokens: int, context: int) -> int:
    """Tokens ``eval_windows`` scores when the data is long enough."""
    return max(1, n_tokens // context) * context


def _stack(tokens: np.ndarray, starts: np.ndarray, context: int) -> torch.Tensor:
    out = np.full((len(starts), context + 1), PAD, dtype=np.int64)
    for row, start in enumerate(starts):
        window = np.asarray(tokens[start:start + context + 1], dtype=np.int64)
        out[row, :len(window)] = window
    return torch.from_numpy(out)
