"""Which RUNNING trials a worker fails as dead: Optuna's own trial states are the reference."""

import socket
import subprocess
import sys

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from ckptmerge.search.storage import claim, reap_dead_workers  # noqa: E402


def _dead_worker_id() -> str:
    """host:pid:start of a process that has exited (its pid is free, its start time cannot match)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{child.stdout.strip()}:12345"


def _study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize")


def test_a_claim_by_a_dead_process_is_failed_and_requeued():
    study = _study()
    trial = study.ask()
    trial.set_user_attr("worker", _dead_worker_id())
    trial.set_user_attr("worker_trial", trial.number)
    assert reap_dead_workers(study, grace_s=3600) == [trial.number]
    assert study.trials[trial.number].state == TrialState.FAIL
    assert [t.state for t in study.trials[1:]] == [TrialState.WAITING]  # Optuna's retry callback re-queued it


def test_an_inherited_claim_is_not_a_dead_worker():
    """A re-queued trial carries its dead predecessor's user attributes; a worker that just popped it
    must not lose it to another worker's reap before it writes its own claim."""
    study = _study()
    trial = study.ask()
    trial.set_user_attr("worker", _dead_worker_id())
    trial.set_user_attr("worker_trial", trial.number - 1)  # copied from the trial it retries
    assert reap_dead_workers(study, grace_s=3600) == []
    assert study.trials[trial.number].state == TrialState.RUNNING


def test_an_unclaimed_trial_is_failed_only_after_the_grace_period():
    study = _study()
    trial = study.ask()
    assert reap_dead_workers(study, grace_s=3600) == []
    assert reap_dead_workers(study, grace_s=0) == [trial.number]
    assert study.trials[trial.number].state == TrialState.FAIL


def test_a_live_claim_is_kept():
    study = _study()
    trial = study.ask()
    claim(trial)
    assert reap_dead_workers(study, grace_s=0) == []
    assert study.trials[trial.number].state == TrialState.RUNNING


def test_a_trial_finished_by_another_worker_is_not_an_error_but_other_errors_are():
    """SQLite lets two workers pop one WAITING trial; Optuna's own refusal of the second tell is tolerated."""
    from ckptmerge.search.storage import finished_elsewhere

    study = _study()
    trial = study.ask()
    study.tell(trial, 1.0)  # the other worker finished it first
    with finished_elsewhere():
        study.tell(trial, 2.0)
    assert study.trials[trial.number].value == 1.0
    with pytest.raises(ValueError, match="not a number"):
        with finished_elsewhere():
            raise ValueError("not a number")


class _FinishedWhileTelling(optuna.samplers.RandomSampler):
    """Another worker finishes the trial after this worker's tell read it RUNNING and before the tell writes
    (Optuna calls after_trial exactly in that window): it popped the same trial and completed it first
    (SQLite), or it failed the trial because its heartbeat looked stale."""

    def __init__(self, state):
        super().__init__(seed=0)
        self.state = state

    def after_trial(self, study, trial, state, values):
        study._storage.set_trial_state_values(trial._trial_id, state=self.state,
                                              values=[0.5] if self.state == TrialState.COMPLETE else None)


@pytest.mark.parametrize("elsewhere", [TrialState.COMPLETE, TrialState.FAIL])
def test_a_trial_finished_elsewhere_while_it_is_told_is_not_an_error(elsewhere):
    from ckptmerge.search.storage import finished_elsewhere

    optuna.logging.set_verbosity(optuna.logging.CRITICAL)
    study = optuna.create_study(direction="minimize", sampler=_FinishedWhileTelling(elsewhere))
    with pytest.raises((optuna.exceptions.UpdateFinishedTrialError, AssertionError)):  # Optuna, unguarded
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with finished_elsewhere():
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state for t in study.trials] == [elsewhere, elsewhere]
    with pytest.raises(AssertionError, match="ours"):
        with finished_elsewhere():
            raise AssertionError("ours")


def test_a_resumed_or_second_worker_draws_new_points_and_a_fresh_one_keeps_its_seed():
    """Optuna's RandomSampler with the same seed is the reference: same draws when the study is fresh,
    none of them again for a worker whose first trial comes later (a second worker, or a resumed study)."""
    from ckptmerge.search.study import make_sampler

    def draws(sampler, study, n):
        study.sampler = sampler
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
        return [t.params["x"] for t in study.trials[-n:]]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = draws(optuna.samplers.RandomSampler(seed=7), optuna.create_study(), 4)
    study = optuna.create_study()
    assert draws(make_sampler("random", 7, 0), study, 4) == plain
    resumed = draws(make_sampler("random", 7, 0), study, 4)
    assert not set(resumed) & set(plain)
    with pytest.raises(Exception, match="unknown sampler"):
        make_sampler("grid", 7, 0)
