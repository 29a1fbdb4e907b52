"""Deterministic token windows: training batches as a pure function of (seed, step), eval windows fixed.

Training batches are drawn from a generator seeded by (seed, step, micro-step), so a resumed
run sees exactly the batches it would have seen, with no sampler state to save. Evaluation
windows are evenly spaced over the token file and identical for every model compared.
"""

from __future__ import annotations

import numpy as np
import torch


def train_batch(tokens: np.ndarray, *, seed: int, step: int, micro: int, batch_size: int,
                context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each ``(batch_size, context)`` int64."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    windows = np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


def eval_windows(tokens: np.ndarray, *, n_tokens: int, context: int) -> torch.Tensor:
    """``(n_windows, context + 1)`` windows, evenly spaced, scoring ``n_windows * context`` tokens."""
    n_windows = max(1, n_tokens // context)
    last_start = len(tokens) - context - 1
    if last_start < 0:
        raise ValueError(f"token file has {len(tokens)} tokens, fewer than one window of {context + 1}")
    starts = np.linspace(0, last_start, n_windows).round().astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64))
