"""Search workers that die: a real PostgreSQL study with two CLI workers, one killed with SIGKILL mid-trial,
and a SQLite study whose only worker is killed ten times. Optuna's own records are the reference."""

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_word_corpus
from postgres_server import postgres_url  # noqa: F401 - session fixture

optuna = pytest.importorskip("optuna")
pytest.importorskip("transformers")

from optuna.trial import TrialState  # noqa: E402

from ckptmerge.data.tokenizer import save_hf_tokenizer  # noqa: E402
from ckptmerge.search.spaces import PairSpace  # noqa: E402

POINTS = [0.1, 0.3, 0.45, 0.8, 0.9]  # enqueued pair weights (lambda on the newest checkpoint)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """Two tiny Llama checkpoints (different seeds) as a run directory, and a word corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("workers")
    write_word_corpus(root)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    for step, seed in ((100, 0), (200, 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / "run" / f"step-{step:06d}")
        save_hf_tokenizer(root / "run" / f"step-{step:06d}")  # the byte tokenizer the text is read with
    return root


def _command(root: Path, storage: str, study: str, trials: int) -> list[str]:
    return [sys.executable, "-m", "ckptmerge", "search", str(root / "run"), "--space", "pair", "--data",
            str(root / "val.txt"), "--tokens", "12000", "--trials", str(trials), "--sampler", "random",
            "--storage", storage, "--study", study, "--heartbeat", "1"]


def _env(root: Path) -> dict:
    src = str(Path(__file__).parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "CKPTMERGE_CACHE": str(root / "cache")}


def _enqueue(storage: str, study: str) -> None:
    s = optuna.create_study(study_name=study, storage=_storage(storage), direction="minimize")
    for lam in POINTS:
        s.enqueue_trial({"lam": lam})


_STORAGES: dict[str, object] = {}


def _storage(url: str):
    """One storage object (one connection pool) per URL for all the test's reads."""
    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    return _STORAGES[url]


def _trials(storage: str, study: str, states=None):
    return optuna.load_study(study_name=study, storage=_storage(storage)).get_trials(deepcopy=False, states=states)


def _wait_for_running_trial_of(pids, storage: str, study: str, timeout_s: float = 240, alive=lambda: True):
    """The first trial seen RUNNING in one of the workers ``pids`` (None if the workers finished first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            running = _trials(storage, study, (TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            running = []
        for t in running:
            if t.user_attrs.get("pid") in pids:
                return t
        time.sleep(0.05)
    if alive():
        raise AssertionError(f"workers {pids} never ran a trial")
    return None


def test_two_postgres_workers_survive_a_sigkill_mid_trial(pair_run, postgres_url):  # noqa: F811
    root = pair_run
    trials = len(POINTS) + len(PairSpace().baselines())
    _enqueue(postgres_url, "shared")
    _enqueue(postgres_url, "alone")
    env = _env(root)
    workers = [subprocess.Popen(_command(root, postgres_url, "shared", trials), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    # whichever worker runs a trial first is killed: a slow start can leave the other with nothing to run
    killed = _wait_for_running_trial_of({w.pid for w in workers}, postgres_url, "shared",
                                        alive=lambda: all(w.poll() is None for w in workers))
    assert killed is not None, "a worker ended before any trial was seen running"
    victim, survivor = sorted(workers, key=lambda w: w.pid != killed.user_attrs["pid"])
    victim.send_signal(signal.SIGKILL)
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-3000:]
    assert victim.wait() == -signal.SIGKILL

    shared = _trials(postgres_url, "shared")
    complete = [t for t in shared if t.state == TrialState.COMPLETE]
    assert len(complete) == trials  # exactly --trials, none lost, none counted twice
    assert not [t for t in shared if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = next(t for t in shared if t.number == killed.number)
    assert dead.state == TrialState.FAIL
    rerun = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(rerun) == 1 and rerun[0].params == dead.system_attrs["fixed_params"]
    expected = sorted(POINTS + [p["lam"] for p in PairSpace().baselines().values()])
    assert sorted(t.params["lam"] for t in complete) == expected  # every enqueued point and baseline, once
    assert {t.user_attrs["baseline"] for t in complete if t.user_attrs.get("baseline")} == set(PairSpace().baselines())

    alone = subprocess.run(_command(root, postgres_url, "alone", trials), env=env, capture_output=True, text=True,
                           timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = optuna.load_study(study_name="alone", storage=_storage(postgres_url))
    shared_study = optuna.load_study(study_name="shared", storage=_storage(postgres_url))
    assert shared_study.best_params == single.best_params
    assert shared_study.best_value == single.best_value
    by_lam = {t.params["lam"]: t.value for t in single.get_trials(states=(TrialState.COMPLETE,))}
    assert {t.params["lam"]: t.value for t in complete} == by_lam


def _search_worker(root: str, storage: str, trials: int) -> None:
    from ckptmerge import discover
    from ckptmerge.search.run import search
    from ckptmerge.search.study import SearchConfig

    os.environ["CKPTMERGE_CACHE"] = str(Path(root) / "cache")
    torch.set_num_threads(1)
    cfg = SearchConfig(space="simplex", data=str(Path(root) / "val.txt"), trials=trials, sampler="random",
                       storage=storage, study_name="kills", heartbeat_s=5)
    search(discover(Path(root) / "run3").checkpoints, cfg, n_tokens=4096)


def test_search_killed_ten_times_ends_with_exactly_its_trials_and_every_baseline(pair_run, tmp_path):
    from transformers import LlamaForCausalLM

    root = pair_run
    for i, step in enumerate((100, 200)):  # a third checkpoint: the simplex space has four baselines
        (root / "run3").mkdir(exist_ok=True)
        if not (root / "run3" / f"step-{step:06d}").exists():
            LlamaForCausalLM.from_pretrained(root / "run" / f"step-{step:06d}").save_pretrained(
                root / "run3" / f"step-{step:06d}")
    torch.manual_seed(2)
    model = LlamaForCausalLM.from_pretrained(root / "run" / "step-000200")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "run3" / "step-000300")
    save_hf_tokenizer(root / "run3")  # one tokenizer at the run's root, as many runs keep it

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    trials = 12
    _storage(storage)  # create the schema before any worker starts
    rng = random.Random(0)
    ctx = mp.get_context("fork")  # the parent has already imported torch and transformers: workers start fast
    for _ in range(10):
        worker = ctx.Process(target=_search_worker, args=(str(root), storage, trials))
        worker.start()
        _wait_for_running_trial_of({worker.pid}, storage, "kills", timeout_s=120, alive=worker.is_alive)
        # mid-trial, between trials, or while reporting; a trial can take 50 ms, so a later kill could find
        # the study finished by this one worker and test nothing
        time.sleep(rng.uniform(0.0, 0.2))
        worker.kill()  # SIGKILL
        worker.join()
    final = ctx.Process(target=_search_worker, args=(str(root), storage, trials))
    final.start()
    final.join(600)
    assert final.exitcode == 0

    study = optuna.load_study(study_name="kills", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == trials
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    from ckptmerge.search.spaces import SimplexSpace

    baselines = SimplexSpace(3).baselines()
    done = {t.user_attrs["baseline"]: t.params for t in complete if t.user_attrs.get("baseline")}
    assert set(done) == set(baselines)
    for name, params in baselines.items():
        assert done[name] == pytest.approx(params, abs=1e-12)
    killed = study.get_trials(states=(TrialState.FAIL,))
    assert killed, "no kill landed mid-trial; the test did not test anything"


def test_journal_storage_on_a_shared_file_resumes_to_exactly_its_trials(pair_run, tmp_path, monkeypatch):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from ckptmerge import discover
    from ckptmerge.search.run import search
    from ckptmerge.search.study import SearchConfig

    monkeypatch.setenv("CKPTMERGE_CACHE", str(pair_run / "cache"))
    refs = discover(pair_run / "run").checkpoints
    log = tmp_path / "study.log"
    cfg = SearchConfig(space="pair", data=str(pair_run / "val.txt"), trials=4, sampler="random",
                       storage=f"journal:///{log}", study_name="j")
    search(refs, cfg, n_tokens=1024)
    cfg.trials = 5
    search(refs, cfg, n_tokens=1024)
    study = optuna.load_study(study_name="j", storage=JournalStorage(JournalFileBackend(str(log))))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 5 == len(study.trials)
    assert sum(1 for t in complete if t.user_attrs.get("baseline")) == len(PairSpace().baselines())
