"""What every experiment shares: the scale, the work folder, the in-memory scorer, loaded trajectories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptmerge.reproduce.scale import Scale
from ckptmerge.reproduce.scoring import Scorer, diff, mean, merge
from ckptmerge.reproduce.training import Trajectory, load_trajectory

LOSS_MARGIN = 0.005      # LAWA, E5, E11: 0.5% of the raw loss at the point (the papers' gains are ~3%)
ANNEAL_MARGIN = 0.2      # E6-E8: 20% of the anneal gain
SPIKE_MARGIN = 0.2       # E4, E9: 20% of the spike's raw rise


@dataclass
class Context:
    work: Path
    scale: Scale
    scorer: Scorer
    lrs: dict = field(default_factory=dict)    # tuned, high, extreme (None when it did not train), sweep table
    log: Callable = print
    _loaded: dict = field(default_factory=dict)

    @classmethod
    def create(cls, work: Path, scale: Scale, log: Callable = print) -> "Context":
        return cls(Path(work), scale, Scorer(scale.preset, scale.context, scale.eval_tokens), log=log)

    @property
    def in_domain(self) -> str:
        return self.scale.eval_data

    def traj(self, name: str) -> Trajectory:
        if name not in self._loaded:
            if len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[name] = load_trajectory(self.work, name)
        return self._loaded[name]

    def raw(self, run: str, step: int, data: str | None = None) -> np.ndarray:
        data = data or self.in_domain
        return self.scorer.losses(self.traj(run).snaps[step], data, key=(run, step))

    def merged(self, run: str, steps: Sequence[int], coeffs: Sequence[float] | None = None,
               data: str | None = None) -> np.ndarray:
        data = data or self.in_domain
        coeffs = list(coeffs) if coeffs is not None else [1 / len(steps)] * len(steps)
        key = (run, tuple(steps), tuple(round(c, 9) for c in coeffs))
        snaps = self.traj(run).snaps
        return self.scorer.losses(merge([snaps[t] for t in steps], coeffs), data, key=key)

    def flat(self, flat: torch.Tensor, key: tuple, data: str | None = None) -> np.ndarray:
        return self.scorer.losses(flat, data or self.in_domain, key=key)

    diff = staticmethod(diff)
    mean = staticmethod(mean)
