"""A sampler seeded per worker, so that workers sharing a study (and a resumed study) draw new points.

Every worker of a study runs the same command, so with one ``--seed`` their samplers would draw the same
random points: two workers would evaluate each random or start-up trial twice, and a resumed study would
evaluate its first session's points again. The sampler is therefore made at the worker's first trial and
seeded with ``--seed`` itself when that trial is the study's first (a fresh single-worker search stays
reproducible), otherwise with ``(--seed, the trial's number)``: trial numbers are unique in a study, so no
two workers, and no two sessions, share a seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna


def worker_seed(seed: int, first_trial: int) -> int:
    """The seed of a worker whose first trial is number ``first_trial``."""
    if first_trial == 0:
        return seed
    return int(np.random.SeedSequence([seed, first_trial]).generate_state(1)[0])


class WorkerSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to ``make(seed)``, built at this worker's first trial with ``worker_seed``."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner: optuna.samplers.BaseSampler | None = None

    def before_trial(self, study, trial) -> None:
        if self._inner is None:
            self._inner = self._make(worker_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._inner is not None:
            self._inner.reseed_rng()
