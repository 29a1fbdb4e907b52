"""A sweep's evaluations as trials of one Optuna study, so that many workers share them.

    ckptmerge sweep RUN --storage postgresql://user@db/ckptmerge --study run7-sweep -o RUN-sweep   # on every worker

Every worker runs the same command. Each lists the sweep's evaluations (checkpoints x weights x data),
keyed by what determines them (``CachedScorer.key``: checkpoint content, weights, token windows), and
enqueues the ones the study does not hold yet as WAITING trials whose user attributes name the job. Then it
pops WAITING trials (Optuna hands each to one worker), scores them and stores the result in the trial,
until every job of its list is COMPLETE; the report is built from those trials. A worker killed mid-trial is
handled as in search (``search/storage.py``): its trial is failed and re-queued with the same attributes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.console import progress_bar
from ckptmerge.errors import ConfigError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.search.storage import (
    DEFAULT_HEARTBEAT_S,
    claim,
    fail_dead_trials,
    finished_elsewhere,
    goes_first,
    open_storage,
)
from ckptmerge.sweep.cache import result_fields, result_from_fields
from ckptmerge.sweep.evaluator import CachedScorer

POLL_S = 0.5
KEY_ATTR = "sweep_key"


@dataclass(frozen=True)
class Job:
    """One evaluation of the sweep: ``sum coeffs[i] * refs[i]`` scored on ``data``."""

    refs: tuple[CheckpointRef, ...]
    coeffs: tuple[float, ...]
    data: str


def score_in_study(scorer: CachedScorer, jobs: Sequence[Job], *, storage: str, study_name: str,
                   heartbeat_s: float = DEFAULT_HEARTBEAT_S, progress: bool = True, log=print) -> None:
    """Score ``jobs`` together with every other worker of the study; afterwards all of them are in ``scorer``."""
    study = _open_study(storage, study_name, heartbeat_s)
    by_key = {scorer.key(j.refs, j.coeffs, j.data): j for j in jobs}
    queued = _enqueue_missing(study, by_key)
    log(f"sweep study {study_name!r}: {len(by_key)} evaluations, {queued} newly queued")
    bar = progress_bar(len(by_key), "sweep", unit="eval", enabled=progress)
    while True:
        fail_dead_trials(study, heartbeat_s)
        done, live, queued = _progress(study, by_key)
        bar.update(len(done) - bar.n)
        if len(done) == len(by_key) and not queued:
            break  # (copies still queued, e.g. from a start-up race, are popped and dropped first)
        lost = {k: j for k, j in by_key.items() if k not in done and k not in live}
        _enqueue_missing(study, lost, known=())  # failed for good on another worker: queue again
        if not _waiting(study):
            time.sleep(POLL_S)  # the last jobs run on other workers; stay to re-run any whose worker dies
            continue
        _run_one(study, scorer, by_key)
    bar.close()
    for key, result in done.items():
        if scorer.cache.get(key) is None:
            job = by_key[key]
            scorer.remember(key, result, job.refs, job.coeffs)


def _open_study(storage: str, study_name: str, heartbeat_s: float):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a skipped trial is logged as failed: not news
    backend = open_storage(storage, heartbeat_s=heartbeat_s)
    try:
        return optuna.create_study(storage=backend, study_name=study_name, direction="minimize", load_if_exists=True)
    except ValueError as exc:  # an existing study of another kind (e.g. multi-objective)
        raise ConfigError(f"--study {study_name}: {exc}; choose another study name") from exc


def _enqueue_missing(study, by_key: dict[str, Job], known=None) -> int:
    """Queue the jobs no trial names yet (two workers starting together may both queue one: it runs twice)."""
    if known is None:
        known = {t.user_attrs.get(KEY_ATTR) for t in study.get_trials(deepcopy=False)}
    missing = [k for k in by_key if k not in known]
    for key in missing:
        job = by_key[key]
        study.enqueue_trial({}, user_attrs={KEY_ATTR: key, "checkpoints": [str(r.path) for r in job.refs],
                                            "coeffs": list(job.coeffs), "data": job.data})
    return len(missing)


def _progress(study, by_key: dict[str, Job]) -> tuple[dict, set, set]:
    """The results of this command's finished jobs, the keys of its queued or running ones, and of its
    queued ones."""
    from optuna.trial import TrialState

    done, live, queued = {}, set(), set()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(KEY_ATTR)
        if key not in by_key:
            continue
        if t.state == TrialState.COMPLETE and "result" in t.user_attrs:
            done.setdefault(key, result_from_fields(t.user_attrs["result"]))
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            live.add(key)
            if t.state == TrialState.WAITING:
                queued.add(key)
    return done, live, queued


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class _Skip(Exception):
    """The popped trial needs no work here: Optuna records it FAIL and nothing re-queues it."""


def _run_one(study, scorer: CachedScorer, by_key: dict[str, Job]) -> None:
    """Pop one queued job and score it (another command's job too, from the paths its trial names).

    Through ``study.optimize`` so that Optuna's heartbeat thread runs while the job is scored."""

    def evaluate(trial) -> float:
        key = trial.user_attrs.get(KEY_ATTR)
        job = by_key.get(key) or _job_of(trial)
        if job is None:  # another worker took the last queued trial: this one is fresh and empty
            trial.set_user_attr("idle", True)
            raise _Skip
        claim(trial)
        if goes_first(study, trial, KEY_ATTR):
            trial.set_user_attr("duplicate", True)  # queued twice by workers that started together
            raise _Skip
        scorer.scorer.forget(keep=job.refs)
        result = scorer.score(job.refs, job.coeffs, job.data)
        trial.set_user_attr("result", result_fields(result))
        return result.loss

    with finished_elsewhere():
        study.optimize(evaluate, n_trials=1, catch=(_Skip,))  # any other error: the trial is FAIL, then raised


def _job_of(trial) -> Job | None:
    """The job another sweep command queued (same study name), when its checkpoints exist here."""
    attrs = trial.user_attrs
    if attrs.get(KEY_ATTR) is None:
        return None
    paths = [Path(p) for p in attrs["checkpoints"]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        warnings.warn(f"trial {trial.number}: a job of another sweep sharing this study names {missing[0]}, which "
                      f"this worker cannot see; left to that sweep's workers. Give each sweep its own --study")
        return None
    return Job(tuple(CheckpointRef(p) for p in paths), tuple(attrs["coeffs"]), attrs["data"])


def study_jobs(windows: Sequence[tuple[Sequence[CheckpointRef], Sequence[float]]], data: Sequence[str]) -> list[Job]:
    """One job per (window, data set), in order, without repeats."""
    jobs = [Job(tuple(refs), tuple(float(c) for c in coeffs), d) for refs, coeffs in windows for d in data]
    return list(dict.fromkeys(jobs))
