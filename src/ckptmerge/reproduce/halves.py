"""The two halves of the held-out windows: half A (even windows) selects, half B (odd windows) scores.

What is chosen on A is never scored on the windows that chose it. A non-finite window loss (a
diverged model) counts as ``UNIFORM_LOSS`` = ln 256, the loss of a uniform byte predictor.
"""

from __future__ import annotations

import math

import numpy as np

UNIFORM_LOSS = math.log(256)


def half(values: np.ndarray, which: str) -> np.ndarray:
    return values[0::2] if which == "A" else values[1::2]


def diff(a: np.ndarray, b: np.ndarray, which: str = "B") -> tuple[float, float]:
    """Paired ``a - b`` on one half of the windows: (mean, standard error)."""
    d = half(np.asarray(a), which) - half(np.asarray(b), which)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def mean(values: np.ndarray, which: str = "B") -> float:
    return float(half(np.asarray(values), which).mean())
