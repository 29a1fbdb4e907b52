"""In-memory held-out losses of flat weight vectors (raw snapshots or merges), window by window.

Windows alternate between half A (even: selection) and half B (odd: scoring), so what is chosen on
A is never scored on the windows that chose it. A non-finite window loss (a diverged model) counts as
ln 256, the loss of a uniform byte predictor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

UNIFORM_LOSS = math.log(256)


class Scorer:
    """One model of the preset, evaluated on fixed windows of each domain; results cached by key."""

    def __init__(self, preset: str, context: int, eval_tokens: int):
        from ckptmerge.train.presets import build_model

        self.model = build_model(preset, 0)
        self.context, self.eval_tokens = context, eval_tokens
        self._windows: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, np.ndarray] = {}

    def windows(self, data: str) -> torch.Tensor:
        if data not in self._windows:
            from ckptmerge.data.batches import eval_windows
            from ckptmerge.data.tokens import load_tokens

            self._windows[data] = eval_windows(load_tokens(data), n_tokens=self.eval_tokens, context=self.context)
        return self._windows[data]

    def losses(self, flat: torch.Tensor, data: str, key: tuple | None = None) -> np.ndarray:
        """Per-window losses of the weights ``flat`` on ``data``."""
        if key is not None and (key, data) in self._cache:
            return self._cache[(key, data)]
        from ckptmerge.evaluation.evaluator import evaluate_model

        torch.nn.utils.vector_to_parameters(flat.float(), self.model.parameters())
        values = np.asarray(evaluate_model(self.model, self.windows(data), batch_size=32).window_losses)
        values = np.where(np.isfinite(values), values, UNIFORM_LOSS)
        if key is not None:
            self._cache[(key, data)] = values
        return values


def merge(snaps: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i theta_i`` accumulated in fp64, returned in fp32."""
    out = torch.zeros_like(snaps[0], dtype=torch.float64)
    for snap, c in zip(snaps, coeffs):
        out.add_(snap.double(), alpha=float(c))
    return out.float()


def half(values: np.ndarray, which: str) -> np.ndarray:
    return values[0::2] if which == "A" else values[1::2]


def diff(a: np.ndarray, b: np.ndarray, which: str = "B") -> tuple[float, float]:
    """Paired ``a - b`` on one half of the windows: (mean, standard error)."""
    d = half(np.asarray(a), which) - half(np.asarray(b), which)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def mean(values: np.ndarray, which: str = "B") -> float:
    return float(half(np.asarray(values), which).mean())
