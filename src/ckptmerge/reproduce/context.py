"""What every experiment shares: the scale, the work folder, the in-memory scorer, loaded trajectories.

Weights are scored by ``evaluation/scoring.py`` (a resident model of the preset, ``score_vector``) and
merged there too (``merge_vectors``: fp64 accumulation); per-window losses are cached by key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptmerge.evaluation.scoring import Scorer, merge_vectors
from ckptmerge.reproduce.halves import UNIFORM_LOSS, diff, mean
from ckptmerge.reproduce.scale import Scale
from ckptmerge.reproduce.training import Trajectory, load_trajectory

LOSS_MARGIN = 0.005      # LAWA, E5, E11: 0.5% of the raw loss at the point (the papers' gains are ~3%)
ANNEAL_MARGIN = 0.2      # E6-E8: 20% of the anneal gain
SPIKE_MARGIN = 0.2       # E4, E9: 20% of the spike's raw rise
EVAL_BATCH = 32          # windows per forward pass


@dataclass
class Context:
    work: Path
    scale: Scale
    scorer: Scorer
    lrs: dict = field(default_factory=dict)    # tuned, high, extreme (None when it did not train), sweep table
    log: Callable = print
    _loaded: dict = field(default_factory=dict)
    _losses: dict = field(default_factory=dict)  # (key, data) -> per-window losses

    @classmethod
    def create(cls, work: Path, scale: Scale, log: Callable = print) -> "Context":
        from ckptmerge.train.presets import build_model

        scorer = Scorer.resident(build_model(scale.preset, 0), context=scale.context, n_tokens=scale.eval_tokens,
                                 batch_size=EVAL_BATCH)
        return cls(Path(work), scale, scorer, log=log)

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
        return self.flat(self.traj(run).snaps[step], (run, step), data)

    def merged(self, run: str, steps: Sequence[int], coeffs: Sequence[float] | None = None,
               data: str | None = None) -> np.ndarray:
        coeffs = list(coeffs) if coeffs is not None else [1 / len(steps)] * len(steps)
        key = (run, tuple(steps), tuple(round(c, 9) for c in coeffs))
        if (key, data or self.in_domain) in self._losses:
            return self._losses[(key, data or self.in_domain)]
        snaps = self.traj(run).snaps
        return self.flat(merge_vectors([snaps[t] for t in steps], coeffs), key, data)

    def flat(self, flat: torch.Tensor, key: tuple, data: str | None = None) -> np.ndarray:
        """Per-window held-out losses of the flat weights ``flat`` (cached under ``key``)."""
        data = data or self.in_domain
        if (key, data) not in self._losses:
            values = np.asarray(self.scorer.score_vector(flat, data).window_losses)
            self._losses[(key, data)] = np.where(np.isfinite(values), values, UNIFORM_LOSS)
        return self._losses[(key, data)]

    diff = staticmethod(diff)
    mean = staticmethod(mean)
