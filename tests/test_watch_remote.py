"""``ckptmerge watch s3://bucket/run -o OUT`` (OUT local; an OUT at a URL: tests/test_watch_remote_out.py) follows a run that lives in an object store, served by a
real S3 API server on this machine (moto, ``tests/s3_server.py``): the run is uploaded checkpoint by checkpoint
with a watch after each, and every ``OUT/<method>/`` is read back and compared with the local offline merge of
the same files (bit for bit) and with an fp64 NumPy reference."""

from __future__ import annotations

import json
import time
import urllib.parse

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptmerge import compute_coeffs, discover, merge
from ckptmerge.cli.main import main
from ckptmerge.online.watch import WatchConfig, Watcher
from conftest import make_state, reference_merge, to_f64
from s3_server import SECRET, proxy, s3, s3_server, upload  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

URL = "s3://watched-runs/{}"  # a bucket of its own: test_remote.py also uploads runs/changed


def _add(s3, run, name: str, step: int, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint written locally (the reference's copy) and uploaded to watched-runs/<name>/checkpoint-<step>."""
    state = make_state(seed, step=step)
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    upload(s3, folder, f"watched-runs/{name}/checkpoint-{step}")
    return state


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _lists(requests, run_prefixes: list | None = None) -> tuple[int, int, int]:
    """(LIST requests, HEAD requests, other requests) among the proxy's log; each LIST's prefix is appended to
    ``run_prefixes`` when given."""
    lists = heads = other = 0
    for method, path, _ in requests:
        query = urllib.parse.urlparse(path).query
        if method == "GET" and "list-type" in query:
            lists += 1
            if run_prefixes is not None:
                fields = urllib.parse.parse_qs(query, keep_blank_values=True)
                run_prefixes.append((fields.get("prefix", [""])[0], fields.get("delimiter", [""])[0]))
        elif method == "HEAD":
            heads += 1
        else:
            other += 1
    return lists, heads, other


def test_watch_of_a_bucket_equals_the_offline_merge_step_by_step(tmp_path, s3, capsys):
    run, out, local_out = tmp_path / "run", tmp_path / "out", tmp_path / "local-watch"
    methods = ["--method", "sma:n=3", "--method", "ema:alpha=0.2"]
    states = []
    for i in range(5):
        states.append(_add(s3, run, "steps", 100 * (i + 1), seed=i))
        assert main(["watch", URL.format("steps"), "-o", str(out), *methods, "--once", "--settle-s", "0"]) == 0
        assert f"step {100 * (i + 1)} -> sma-n3, ema-alpha0.2" in capsys.readouterr().out
        # the local watch of the same files, for the running EMA's bytes
        assert main(["watch", str(run), "-o", str(local_out), *methods, "--once", "--settle-s", "0"]) == 0

        refs = discover(run).checkpoints
        window = refs[-3:]
        merge(window, compute_coeffs("sma", window), tmp_path / "offline-sma", progress=False, force=True)
        sma = _tensors(out / "sma-n3")
        _assert_bitwise(sma, _tensors(tmp_path / "offline-sma"))
        for name, value in reference_merge(states[-3:], [1 / len(window)] * len(window)).items():
            np.testing.assert_allclose(to_f64(sma[name]), value, rtol=1e-6, atol=1e-6, err_msg=name)

        ema = _tensors(out / "ema-alpha0.2")
        _assert_bitwise(ema, _tensors(local_out / "ema-alpha0.2"))  # folded exactly as locally
        coeffs = compute_coeffs("ema", refs, alpha=0.2)
        merge(refs, coeffs, tmp_path / "offline-ema", progress=False, force=True)
        offline = _tensors(tmp_path / "offline-ema")
        for name, value in reference_merge(states, coeffs).items():
            np.testing.assert_allclose(to_f64(ema[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(to_f64(ema[name]), to_f64(offline[name]), rtol=1e-5, atol=1e-6, err_msg=name)

    manifest = json.loads((out / "sma-n3" / "merge.json").read_text())
    run_url = URL.format("steps")
    assert [i["path"] for i in manifest["inputs"]] == [f"{run_url}/checkpoint-{s}" for s in (300, 400, 500)]
    state = json.loads((out / ".watch-state.json").read_text())
    assert state["settings"]["run_dir"] == "s3://watched-runs/steps"  # the URL as given, not resolved as a path
    assert [s["path"] for s in state["seen"]] == [f"{run_url}/checkpoint-{100 * (i + 1)}" for i in range(5)]
    assert not (out / ".retained").exists() and not (tmp_path / "s3:").exists()
    assert SECRET not in json.dumps(state)


def test_each_poll_lists_the_run_once(tmp_path, s3, proxy):
    run, out = tmp_path / "run", tmp_path / "out"
    for i in range(3):
        _add(s3, run, "lists", 100 * (i + 1), seed=i)
    watcher = Watcher(WatchConfig(URL.format("lists"), str(out), methods=["sma:n=2", "ema:alpha=0.5"], settle_s=0))
    proxy.requests.clear()
    assert watcher.poll() == [100, 200, 300]
    lists, heads, _ = _lists(proxy.requests)
    assert heads == 0, proxy.requests
    taking = lists  # discovery's one listing, and the merges' own listings of the checkpoints they read
    for _ in range(3):  # nothing new: one LIST of the run, nothing else
        proxy.requests.clear()
        assert watcher.poll() == []
        assert _lists(proxy.requests) == (1, 0, 0), proxy.requests
    _add(s3, run, "lists", 400, seed=3)
    proxy.requests.clear()
    assert watcher.poll() == [400]
    prefixes = []
    lists, heads, _ = _lists(proxy.requests, prefixes)
    assert heads == 0 and lists <= taking, (lists, taking, proxy.requests)
    run = [d for p, d in prefixes if p.rstrip("/") == "lists"]
    assert run.count("") == 1, prefixes  # the run listed recursively once: discovery and settling
    # each merge written (sma; the EMA's state and output) lists the run's top level for its sidecars (config,
    # tokenizer), one level, no recursion; every other LIST is of a checkpoint of the new step's windows
    assert run.count("/") == 3, prefixes
    assert {p.split("/")[1] for p, _ in prefixes if p.rstrip("/") != "lists"} == {"checkpoint-300", "checkpoint-400"}
    print(f"LISTs: {taking} for 3 new checkpoints, {lists} for 1 ({len(prefixes) - 4} of checkpoints), 1 per poll "
          f"with nothing new")


def test_a_checkpoint_is_taken_once_its_versions_settle(tmp_path, s3):
    run, out = tmp_path / "run", tmp_path / "out"
    _add(s3, run, "settle", 100, seed=0)
    watcher = Watcher(WatchConfig(URL.format("settle"), str(out), methods=["ema:alpha=0.5"], settle_s=0.6))
    assert watcher.poll() == []  # first seen: its versions must stay unchanged for 0.6 s
    time.sleep(0.3)
    save_file({k: v.contiguous() for k, v in make_state(7, step=100).items()}, tmp_path / "other.safetensors")
    # rewritten:
    s3.put_file(str(tmp_path / "other.safetensors"), "watched-runs/settle/checkpoint-100/model.safetensors")
    time.sleep(0.4)
    assert watcher.poll() == []  # another ETag: the clock starts again
    time.sleep(0.7)
    assert watcher.poll() == [100]
    _assert_bitwise(_tensors(out / "ema-alpha0.5"), {k: v.contiguous() for k, v in make_state(7, step=100).items()})
    _add(s3, run, "settle", 200, seed=1)
    started = time.monotonic()  # --once (cron): lists, waits --settle-s, lists again and takes what stayed unchanged
    assert main(["watch", URL.format("settle"), "-o", str(out), "--method", "ema:alpha=0.5", "--once",
                 "--settle-s", "0.5"]) == 0
    assert time.monotonic() - started >= 0.5
    assert json.loads((out / ".watch-state.json").read_text())["methods"]["ema-alpha0.5"]["done_through"] == 200


def test_a_checkpoint_deleted_before_the_window_needs_it_fails_that_method_only(tmp_path, s3, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    methods = ["--method", "sma:n=3", "--method", "ema:alpha=0.2"]
    argv = ["watch", URL.format("deleted"), "-o", str(out), *methods, "--once", "--settle-s", "0"]
    for i in range(2):
        _add(s3, run, "deleted", 100 * (i + 1), seed=i)
        assert main(argv) == 0
    before = _tensors(out / "sma-n3")
    _add(s3, run, "deleted", 300, seed=2)
    s3.rm("watched-runs/deleted/checkpoint-100", recursive=True)  # the trainer's save_total_limit=2
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert "s3://watched-runs/deleted/checkpoint-100: deleted from the run before sma-n3 merged it" in err[0], err[0]
    assert "keep at least 3 checkpoints" in err[0] and "watch that" in err[0], err[0]
    assert "ema" not in err[0]
    _assert_bitwise(_tensors(out / "sma-n3"), before)  # the window of 100, 200: never a shorter window
    state = json.loads((out / ".watch-state.json").read_text())
    assert state["methods"]["sma-n3"]["done_through"] == 200 and state["methods"]["sma-n3"]["error"]
    assert state["methods"]["ema-alpha0.2"]["done_through"] == 300 and not state["methods"]["ema-alpha0.2"]["error"]
    local_out = tmp_path / "local-watch"  # the EMA still equals the local watch of all three files
    assert main(["watch", str(run), "-o", str(local_out), *methods, "--once", "--settle-s", "0"]) == 0
    _assert_bitwise(_tensors(out / "ema-alpha0.2"), _tensors(local_out / "ema-alpha0.2"))

    for i in range(3, 5):  # the window slides past the deleted checkpoint: sma recovers
        _add(s3, run, "deleted", 100 * (i + 1), seed=i)
    assert main(argv) == 0
    refs = discover(run).checkpoints[-3:]
    merge(refs, compute_coeffs("sma", refs), tmp_path / "offline", progress=False, force=True)
    _assert_bitwise(_tensors(out / "sma-n3"), _tensors(tmp_path / "offline"))


def test_an_input_replaced_during_a_watch_merge_fails_that_update(tmp_path, s3, monkeypatch):
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    run, out = tmp_path / "run", tmp_path / "out"
    for i in range(2):
        _add(s3, run, "changed", 100 * (i + 1), seed=i)
    save_file({k: v.contiguous() for k, v in make_state(99).items()}, tmp_path / "other.safetensors")
    original, replaced = RemoteSafetensorsReader.get_rows, []

    def replace_once(self, name, start, stop):
        if not replaced and "checkpoint-200" in str(self.path):  # pinned, and reading tensor data
            replaced.append(1)
            s3.put_file(str(tmp_path / "other.safetensors"), "watched-runs/changed/checkpoint-200/model.safetensors")
        return original(self, name, start, stop)

    monkeypatch.setattr(RemoteSafetensorsReader, "get_rows", replace_once)
    watcher = Watcher(WatchConfig(URL.format("changed"), str(out), methods=["sma:n=2"], settle_s=0))
    watcher.log = lambda line: None
    assert watcher.poll() == [100, 200]
    progress = watcher.state.methods["sma-n2"]
    assert "checkpoint-200" in progress.error and "changed while it was being merged" in progress.error
    assert progress.done_through == 100  # the window of 100 alone was published before; 100, 200 was not
    assert json.loads((out / "sma-n2" / "merge.json").read_text())["inputs"][-1]["path"].endswith("checkpoint-100")
