"""Workers of one study draw different points, even when two of them popped the same queued trial first."""

import optuna
import pytest

from ckptmerge.search.study import make_sampler


def _worker_points(storage: str, popped: int, created: int) -> list[float]:
    """A worker whose first trial was the queued trial ``popped``, then the new trial ``created``: the points
    its sampler draws for three new trials after that."""
    study = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler("random", 0, 1))
    trials = study.get_trials(deepcopy=False)
    study.sampler.before_trial(study, trials[popped])
    study.sampler.before_trial(study, trials[created])
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    return [study.sampler.sample_independent(study, trials[created], "x", dist) for _ in range(3)]


@pytest.fixture
def storage(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "b"})  # trial 0: queued, popped by both workers
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING))  # trials 1, 2: created
    return url


def test_two_workers_that_popped_the_same_queued_trial_draw_different_points(storage):
    # SQLite has no row locks: two workers can both pop queued trial 0. Each then creates its own trial.
    first, second = _worker_points(storage, popped=0, created=1), _worker_points(storage, popped=0, created=2)
    assert len(set(first + second)) == 6


def test_a_worker_is_reproducible_from_its_seed_and_first_created_trial(storage):
    assert _worker_points(storage, popped=0, created=1) == _worker_points(storage, popped=0, created=1)
