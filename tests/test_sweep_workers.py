"""`ckptmerge sweep --storage`: the same command on several workers shares one study of evaluations.

References: a one-process sweep without storage (itself checked against an fp64 NumPy average in
test_sweep_recover.py) and Optuna's own trial records (every evaluation COMPLETE once, a killed one FAIL
and re-run from its re-queued copy).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_word_corpus
from postgres_server import postgres_url  # noqa: F401 - session fixture

optuna = pytest.importorskip("optuna")
pytest.importorskip("transformers")

from optuna.trial import TrialState  # noqa: E402

from ckptmerge.sweep.run import SweepConfig, sweep  # noqa: E402
from ckptmerge.sweep.shared_study import KEY_ATTR  # noqa: E402
from ckptmerge.train.trainer import TrainConfig, train  # noqa: E402

GRID = dict(methods=["sma", "ema:alpha=0.5"], n=[2, 3], every=[5, 10], at=[20, 30, 40], n_tokens=2048)
# fewer, longer evaluations (8x the tokens): a kill lands inside one more often than between two
SLOW_GRID = dict(methods=["sma"], n=[2, 3], every=[5, 10], at=[30, 40], n_tokens=16384)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-workers")
    write_word_corpus(root)
    train(TrainConfig(preset="tiny", steps=40, lr=1e-2, warmup_steps=2, batch_size=8, context=32, save_every=5,
                      data=str(root / "train.txt"), seed=5, log_every=1), root / "stable", progress=False)
    return root


def _one_process(run, folder, grid):
    return sweep(run / "stable", SweepConfig(**grid, data=[str(run / "val.txt")]), folder, progress=False,
                 log=lambda *_: None)


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    return _one_process(run, tmp_path_factory.mktemp("one-process"), GRID)


def _command(run: Path, storage: str, study: str, out: Path, grid: dict = GRID) -> list[str]:
    def commas(values):
        return ",".join(str(v) for v in values)

    return [sys.executable, "-m", "ckptmerge", "sweep", str(run / "stable"), "--data", str(run / "val.txt"),
            *[f"--method={m}" for m in grid["methods"]], "--last", commas(grid["n"]), "--every", commas(grid["every"]),
            "--at", commas(grid["at"]), "--tokens", str(grid["n_tokens"]), "--storage", storage, "--study", study,
            "-o", str(out), "--heartbeat", "5", "--quiet"]


def _env() -> dict:
    src = str(Path(__file__).parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _same_rows(report: dict, reference: dict) -> None:
    assert [(r["recipe"], r["step"]) for r in report["rows"]] == [(r["recipe"], r["step"]) for r in reference["rows"]]
    for got, want in zip(report["rows"], reference["rows"]):
        for d, loss in want["loss"].items():
            assert got["loss"][d] == pytest.approx(loss, abs=1e-5), (got["recipe"], got["step"])
            assert got["vs_raw"][d][0] == pytest.approx(want["vs_raw"][d][0], abs=1e-5)


def test_two_postgres_workers_share_the_sweep_and_both_report_it(run, reference, tmp_path, postgres_url):  # noqa: F811
    workers = [subprocess.Popen(_command(run, postgres_url, "two", tmp_path / f"out{i}"), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
        assert "warning" not in err.lower(), err[-3000:]  # Optuna's experimental notices are not the user's concern
    reports = [json.loads((tmp_path / f"out{i}" / "report.json").read_text()) for i in range(2)]
    for report in reports:
        _same_rows(report, reference)
        assert "storage" not in report["config"]  # a database URL may hold a password

    study = optuna.load_study(study_name="two", storage=postgres_url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    keys = [t.user_attrs[KEY_ATTR] for t in complete]
    assert set(keys) == {t.user_attrs.get(KEY_ATTR) for t in study.trials} - {None}  # every queued job done
    assert len(keys) - len(set(keys)) < len(set(keys)) // 4  # repeats only from rare races, not every job twice
    assert sum(r["cache"]["scored"] for r in reports) == len(complete)  # each worker scored only its trials
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_a_worker_killed_mid_evaluation_leaves_its_trial_to_the_next(run, tmp_path):
    reference = _one_process(run, tmp_path / "one-process", SLOW_GRID)
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    optuna.storages.RDBStorage(storage)  # the schema, before any worker
    killed = None
    for attempt in range(8):  # a kill can land between two evaluations; try again until one lands inside
        worker = subprocess.Popen(_command(run, storage, "kill", tmp_path / "killed", SLOW_GRID), env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = _running_trial_of(worker, storage, "kill")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        if killed is not None and _state(storage, "kill", killed) == TrialState.RUNNING:
            break
    else:
        pytest.fail("no kill landed during an evaluation in 8 tries")
    last = subprocess.run(_command(run, storage, "kill", tmp_path / "last", SLOW_GRID), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    _same_rows(json.loads((tmp_path / "last" / "report.json").read_text()), reference)

    study = optuna.load_study(study_name="kill", storage=storage)
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL
    rerun = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state for t in rerun] == [TrialState.COMPLETE]
    assert rerun[0].user_attrs[KEY_ATTR] == dead.user_attrs[KEY_ATTR]
    keys = {t.user_attrs[KEY_ATTR] for t in study.trials if t.state == TrialState.COMPLETE}
    assert keys == {t.user_attrs.get(KEY_ATTR) for t in study.trials} - {None}


def _running_trial_of(worker: subprocess.Popen, storage: str, study: str, timeout_s: float = 240) -> int | None:
    """The number of a trial RUNNING in ``worker`` (None if the worker ended first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            trials = []
        for t in trials:
            if t.user_attrs.get("pid") == worker.pid and t.user_attrs.get("worker_trial") == t.number:
                return t.number
        time.sleep(0.02)
    return None


def _state(storage: str, study: str, number: int):
    return optuna.load_study(study_name=study, storage=storage).trials[number].state


def test_journal_storage_sweep_equals_the_one_process_sweep_and_reruns_score_nothing(run, reference, tmp_path):
    cfg = SweepConfig(**GRID, data=[str(run / "val.txt")], storage=f"journal:///{tmp_path / 'sweep.log'}",
                      study="journal")
    first = sweep(run / "stable", cfg, tmp_path / "a", progress=False, log=lambda *_: None)
    _same_rows(first, reference)
    again = sweep(run / "stable", cfg, tmp_path / "b", progress=False, log=lambda *_: None)  # another machine
    assert again["cache"]["scored"] == 0  # every result came from the study, none scored twice
    assert again["rows"] == first["rows"]
