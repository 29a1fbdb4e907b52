"""A sampler seeded per worker, so that workers sharing a study (and a resumed study) draw new points.

Every worker of a study runs the same command, so with one ``--seed`` their samplers would draw the same
random points: two workers would evaluate each random or start-up trial twice, and a resumed study would
evaluate its first session's points again. The sampler is therefore seeded at the first trial this worker
*created*, with ``(--seed, that trial's number)``. Only a created trial will do: Optuna gives each new trial a
number no other trial of the study has, while a queued trial (a baseline) is popped by whichever worker asks
first, and on SQLite two workers can pop the same one, so seeding from it once gave two workers one seed
and one stream of points. Queued trials have fixed parameters and draw nothing from the sampler; until
this worker creates a trial they are served by a provisional sampler seeded with ``--seed``. The worker that
created the study's first non-queued trial keeps ``--seed`` itself, so a fresh single-worker search draws what
Optuna's sampler with that seed draws; only one worker can be that one, since trial numbers are unique.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna


def worker_seed(seed: int, first_created_trial: int, created_before: bool) -> int:
    """The seed of a worker whose first created (not queued) trial is number ``first_created_trial``;
    ``created_before``: another trial below that number was created, not queued (another worker's, an earlier
    session's)."""
    if not created_before:
        return seed
    return int(np.random.SeedSequence([seed, first_created_trial]).generate_state(1)[0])


def _was_queued(trial: optuna.trial.FrozenTrial) -> bool:
    return "fixed_params" in trial.system_attrs


class WorkerSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to ``make(seed)``, built at this worker's first created trial with ``worker_seed``."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner: optuna.samplers.BaseSampler | None = None
        self._seeded = False  # False while ``_inner`` is the provisional sampler of queued trials

    def before_trial(self, study, trial) -> None:
        if not self._seeded and not _was_queued(trial):
            created_before = any(not _was_queued(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
            self._inner = self._make(worker_seed(self._seed, trial.number, created_before))
            self._seeded = True
        elif self._inner is None:
            self._inner = self._make(self._seed)
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
