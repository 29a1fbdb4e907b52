"""Optuna storages for workers on many machines, and recovery of trials whose worker died.

``--storage`` takes any URL Optuna's RDBStorage takes (``sqlite:///study.db``, ``postgresql://user@host/db``,
``mysql+pymysql://user:pw@host/db``) or ``journal:///shared/fs/study.log`` (Optuna's JournalStorage on a
shared filesystem). Every worker runs the same command against it.

A worker killed mid-trial leaves its trial RUNNING. Two of Optuna's own mechanisms turn it into FAIL and
re-queue its parameters (``RetryFailedTrialCallback``: a WAITING copy with the same params and user attrs):
- RDB storages get a heartbeat: each running trial's worker writes one every ``heartbeat_s`` seconds and
  any worker fails a trial whose heartbeat is older than ``grace_s`` (``optuna.storages.fail_stale_trials``);
- on every storage, a trial whose worker was a process on this host that no longer exists is failed at
  once (the trial records ``worker`` = host:pid:start-time), so a restart after kill -9 does not wait.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import warnings
from collections.abc import Iterator

from ckptmerge.errors import CkptMergeError
from ckptmerge.io.process_liveness import process_alive, start_ticks

DEFAULT_HEARTBEAT_S = 10.0
MAX_RETRY = 3
_DRIVERS = {"postgresql": "psycopg[binary] (or psycopg2-binary, with postgresql+psycopg2://)", "mysql": "pymysql (mysql+pymysql://)"}


def open_storage(url: str | None, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S, grace_s: float | None = None):
    """An Optuna storage for ``url`` (None: in memory, one process)."""
    if url is None:
        return None
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url.removeprefix("journal:").removeprefix("//")
        return JournalStorage(JournalFileBackend(path))
    for attempt in range(3):  # workers starting together on a new database race to create its tables
        try:
            return _rdb_storage(url, heartbeat_s, grace_s)
        except ModuleNotFoundError as exc:
            scheme = url.split(":", 1)[0].split("+", 1)[0]
            raise CkptMergeError(f"--storage {_redact(url)}: the database driver is missing ({exc.name}); "
                                 f"pip install {_DRIVERS.get(scheme, exc.name)}") from exc
        except Exception as exc:  # sqlalchemy's OperationalError, ArgumentError, ...
            if attempt == 2:
                raise CkptMergeError(f"--storage {_redact(url)}: cannot open the study database: "
                                     f"{str(exc).splitlines()[0]}; check the URL and that the server is running") from exc
            time.sleep(1.0 + attempt)


def _rdb_storage(url: str, heartbeat_s: float, grace_s: float | None):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, round(heartbeat_s)),
                                              grace_period=max(2, round(grace_s or grace_period(heartbeat_s))),
                                              **{_stale_callback_arg(): retry_callback()})
        except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError as ImportError
            cause = exc.__cause__
            raise ModuleNotFoundError(str(exc), name=getattr(cause, "name", None) or "driver") from exc


@contextlib.contextmanager
def finished_elsewhere() -> Iterator[None]:
    """Around ``study.optimize``: a trial that was finished elsewhere while it ran here is not an error.

    SQLite has no row locks, so two workers can pop the same WAITING trial and both run it; and a worker
    whose heartbeat stalled past the grace period (a swapping or overloaded host) has its trial failed and
    re-queued by another worker. Optuna then refuses this worker's ``tell``: with ValueError "Cannot tell a
    COMPLETE trial" when the trial was finished before the tell read it; when it was finished between that
    read and the write, with UpdateFinishedTrialError (finished COMPLETE) or, Optuna 5's own slip, with an
    AssertionError "Should not reach." from its trial loop (finished FAIL). The trial's outcome is recorded
    either way (the same value, or a FAIL whose re-queued copy runs again): this worker goes on.
    """
    import optuna

    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except AssertionError as exc:
        if not _optuna_tell_slip(exc):
            raise
    except ValueError as exc:
        if not str(exc).startswith("Cannot tell a "):
            raise


def _optuna_tell_slip(exc: AssertionError) -> bool:
    """The assertion Optuna's ``_run_trial`` fails when the trial it tells was failed by another worker."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return str(exc) == "Should not reach." and bool(frames) and \
        frames[-1].filename.endswith(os.path.join("optuna", "study", "_optimize.py"))


def goes_first(study, trial, attr: str) -> bool:
    """Whether another trial with the same ``attr`` user attribute as ``trial`` (a baseline, a sweep job)
    goes before it: complete, or numbered lower (created earlier) and queued or running. Of such twins only
    the lowest-numbered live one runs: the later one always sees the earlier, whatever the timing, so two
    never both run, and the worker that pops a later twin drops it itself."""
    from optuna.trial import TrialState

    value = trial.user_attrs.get(attr)
    if value is None:
        return False
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    return any(t.number != trial.number and t.user_attrs.get(attr) == value and
               (t.state == TrialState.COMPLETE or t.number < trial.number) for t in live)


def fail_dead_trials(study, heartbeat_s: float) -> None:
    """Fail and re-queue the RUNNING trials whose worker is gone: a dead process on this host at once, any
    other worker once its heartbeat is silent for the grace period (``grace_period(heartbeat_s)``)."""
    reap_dead_workers(study, grace_period(heartbeat_s))
    fail_stale(study)


def fail_stale(study) -> None:
    """Optuna's heartbeat check: fail (and re-queue) the running trials silent past the grace period."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _stale_callback_arg() -> str:
    """The RDBStorage argument for the stale-trial callback: renamed in Optuna 4.9, the old name deprecated."""
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def grace_period(heartbeat_s: float) -> float:
    """Seconds of silence after which a running trial counts as dead."""
    return 3 * heartbeat_s


def retry_callback():
    from optuna.storages import RetryFailedTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        return RetryFailedTrialCallback(max_retry=MAX_RETRY)


def worker_id() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{start_ticks(os.getpid())}"


def worker_gone(worker: str | None) -> bool:
    """True only when ``worker`` was a process on this host that no longer runs."""
    if not worker or worker.count(":") < 2:
        return False
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return False  # another machine: the heartbeat decides
    return not process_alive(int(pid), start)


def claim(trial) -> None:
    """Record this process as the worker of ``trial``. A re-queued trial carries its dead predecessor's user
    attributes, so the claim names the trial number it was made for."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("worker_trial", trial.number)
    trial.set_user_attr("pid", os.getpid())


def claimed_by(trial) -> str | None:
    """The worker that claimed ``trial`` itself (None while unclaimed, and for a copy's inherited claim)."""
    if trial.user_attrs.get("worker_trial") != trial.number:
        return None
    return trial.user_attrs.get("worker")


def reap_dead_workers(study, grace_s: float) -> list[int]:
    """Fail (and re-queue) the RUNNING trials whose worker process on this host is gone, and those that never
    recorded a worker (killed between Optuna's ask and our first write) for longer than ``grace_s``;
    returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # Optuna's public fail_stale_trials uses the same handle
    failed = []
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = claimed_by(trial)
        orphan = worker is None and trial.datetime_start is not None and \
            (now - trial.datetime_start).total_seconds() > grace_s
        if not (orphan or worker_gone(worker)):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
    for trial in failed:
        retry_callback()(study, storage.get_trial(trial._trial_id))
    return [t.number for t in failed]


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
