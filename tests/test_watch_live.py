"""``watch`` on a live run: several methods, a trainer that deletes old checkpoints, trackers read back with their
own clients, and kill -9 at any moment followed by a restart."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_state
from safetensors.torch import load_file, save_file

from ckptmerge import compute_coeffs, discover, merge
from ckptmerge.online.watch import WatchConfig, Watcher

METHODS = ["sma:n=3", "ema:alpha=0.3", "minus_sqrt:n=4"]
TESTS = Path(__file__).parent


def _settle(folder: Path) -> None:
    old = time.time() - 60
    for file in folder.rglob("*"):
        os.utime(file, (old, old))


def _save(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    _settle(folder)
    return folder


def _offline(keep: Path, spec: str, steps: list[int], out: Path) -> dict:
    """The offline merge of the window the method covers at the newest of ``steps`` (from a full copy of the run)."""
    from ckptmerge.merging.method_spec import parse_method

    method = parse_method(spec)
    refs = [r for r in discover(keep).checkpoints if r.step in steps]
    window = refs if method.name == "ema" and method.n is None else refs[-(method.n or 5):]
    merge(window, method.coeffs(window), out, force=True, progress=False)
    return load_file(out / "model.safetensors")


def test_three_methods_follow_a_run_that_deletes_old_checkpoints(tmp_path):
    run, keep, out = tmp_path / "run", tmp_path / "all", tmp_path / "watch"
    watcher = Watcher(WatchConfig(str(run), str(out), methods=METHODS, settle_s=1.0))
    steps = []
    for i in range(7):
        step = 100 * (i + 1)
        state = make_state(i, step=step)
        _save(run / f"step-{step:06d}", state)
        _save(keep / f"step-{step:06d}", state)
        steps.append(step)
        for old in steps[:-2]:  # save_total_limit=2: the trainer deletes all but its last two checkpoints
            shutil.rmtree(run / f"step-{old:06d}", ignore_errors=True)
        assert watcher.poll() == [step]
        for spec in METHODS:
            label = spec.replace(":", "-").replace(",", "-").replace("=", "")
            want = _offline(keep, spec, steps, tmp_path / "offline")
            got = load_file(out / label / "model.safetensors")
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=f"{spec} {name} @{step}")
    retained = sorted(p.name for p in (out / ".retained").iterdir())
    assert retained == ["step-000400", "step-000500", "step-000600", "step-000700"]  # minus_sqrt:n=4's window


# --- evaluation and trackers ------------------------------------------------------------------------

def _tiny_llama_run(run: Path, n: int) -> None:
    """n checkpoints of a tiny Llama that drift apart, each with the byte tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    from ckptmerge.data.tokenizer import save_hf_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        folder = run / f"checkpoint-{10 * (i + 1)}"
        model.save_pretrained(folder)
        save_hf_tokenizer(folder)
        _settle(folder)


def _watch_cli(run: Path, out: Path, data: Path, tb: Path, mlflow_uri: str) -> list[str]:
    return ["watch", str(run), "-o", str(out), *sum((["--method", m] for m in METHODS[:2]), []),
            "--data", str(data), "--tokens", "512", "--settle-s", "1", "--once", "--device", "cpu",
            "--log", f"tensorboard:{tb}", "--log", f"mlflow:{mlflow_uri}"]


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow(uri: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ckptmerge-watch")
    (run,) = client.search_runs([experiment.experiment_id])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("live")
    _tiny_llama_run(root / "run", 4)
    data = root / "held.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return root, data


def test_trackers_hold_one_value_per_step_equal_to_eval(live, tmp_path):
    from ckptmerge.cli.main import main
    from ckptmerge.evaluation.runner import evaluate_paths

    root, data = live
    out, tb, uri = tmp_path / "watch", tmp_path / "tb", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(_watch_cli(root / "run", out, data, tb, uri)) == 0
    board, flow = _tensorboard(tb), _mlflow(uri)
    steps = [10, 20, 30, 40]
    keep = root / "run"
    for step in steps:  # the reference: ckptmerge's evaluator on the raw checkpoint and the offline merges
        models = {"raw": keep / f"checkpoint-{step}"}
        for spec in METHODS[:2]:
            models[spec] = tmp_path / f"ref-{spec.replace(':', '-')}-{step}"
            _offline(keep, spec, [s for s in steps if s <= step], models[spec])
            for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
                shutil.copyfile(keep / f"checkpoint-{step}" / name, models[spec] / name)
        want = evaluate_paths(list(models.values()), [str(data)], n_tokens=512)
        for name, path in models.items():
            label = "raw" if name == "raw" else f"merged/{name.replace(':', '-').replace('=', '')}"
            key = f"eval/{label}/held.txt/loss"
            expected = want[str(path)][str(data)].loss
            for history in (board, flow):
                values = [v for s, v in history[key] if s == step]
                assert len(values) == 1, (key, step, history[key])
                assert values[0] == pytest.approx(expected, rel=1e-5, abs=1e-6), (key, step)
    assert [s for s, _ in flow["watch/step"]] == steps and [s for s, _ in board["watch/step"]] == steps
    report = main(["watch", str(root / "run"), "-o", str(out), "--report"])
    assert report == 0 and (out / "report.png").stat().st_size > 0 and "raw" in (out / "report.html").read_text()


def _state_steps(out: Path) -> int:
    try:
        return len(json.loads((out / ".watch-state.json").read_text())["seen"])
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_twice_then_restart_gives_the_uninterrupted_history(live, tmp_path):
    root, data = live
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def launch(out, tb, uri):
        return subprocess.Popen([sys.executable, "-m", "ckptmerge", *_watch_cli(root / "run", out, data, tb, uri)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    plain = tmp_path / "plain"
    plain_uri = f"sqlite:///{tmp_path / 'plain.db'}"
    assert launch(plain / "out", plain / "tb", plain_uri).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    args = (killed / "out", killed / "tb", f"sqlite:///{tmp_path / 'killed.db'}")
    for progress in (1, 3):  # killed once it has taken in 1 checkpoint, then again after 3
        proc = launch(*args)
        while proc.poll() is None and _state_steps(killed / "out") < progress:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    final = launch(*args)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]
    assert _tensorboard(killed / "tb") == _tensorboard(plain / "tb")
    assert _mlflow(args[2]) == _mlflow(plain_uri)
    for label in ("sma-n3", "ema-alpha0.3"):
        a, b = load_file(killed / "out" / label / "model.safetensors"), load_file(plain / "out" / label / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), label

