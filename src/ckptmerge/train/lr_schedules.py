"""Learning-rate schedules as pure functions of the step: constant, cosine, WSD.

``lr(step)`` is the rate of the update that takes the model from ``step`` to ``step + 1``.
All three share a linear warm-up from peak/warmup to peak over ``warmup_steps``.

- constant: peak after warm-up.
- cosine: min + (peak - min) (1 + cos(pi p)) / 2, p from 0 after warm-up to 1 at ``total_steps``.
- wsd: warm-up, stable at peak, then a decay over the last ``decay_steps`` with shape
  ``linear`` (1 - p), ``cosine`` ((1 + cos(pi p)) / 2) or ``1-sqrt`` (1 - sqrt(p)), down to min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_NAMES = ("constant", "cosine", "wsd")
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


@dataclass(frozen=True)
class LrSchedule:
    name: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int = 0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown LR schedule {self.name!r}; choose one of {SCHEDULE_NAMES}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"unknown decay shape {self.decay_shape!r}; choose one of {list(DECAY_SHAPES)}")
        if self.name == "wsd" and not 0 < self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(f"wsd needs 0 < decay_steps ({self.decay_steps}) <= total - warmup "
                             f"({self.total_steps - self.warmup_steps})")

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps if self.name == "wsd" else self.total_steps

    def __call__(self, step: int) -> float:
        peak, low = self.peak_lr, self.peak_lr * self.min_lr_ratio
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return peak
        if self.name == "cosine":
            p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return low + (peak - low) * DECAY_SHAPES["cosine"](p)
        if step < self.decay_start:
            return peak
        p = min(1.0, (step - self.decay_start) / self.decay_steps)
        return low + (peak - low) * DECAY_SHAPES[self.decay_shape](p)
