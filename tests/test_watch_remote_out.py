"""``ckptmerge watch RUN -o s3://bucket/out``: the watch works in a local folder and publishes every rewritten
``<method>/`` by the commit protocol, against a real S3 API server on this machine (moto, ``tests/s3_server.py``).

Each ``URL/<method>/`` is read back with s3fs (never ckptmerge) and compared with the same watch writing a local
``-o`` folder (the weights byte for byte) and with an fp64 NumPy reference; a watch killed between its local rewrite
and its upload (an exception raised inside the upload, or SIGKILL of a subprocess mid-upload) republishes when
restarted; a denied upload is reported, retried and makes ``--once`` exit 2; a missing bucket, a wrong endpoint or
a denied write is one line, exit 2, before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptmerge import compute_coeffs, discover
from ckptmerge.cli.main import main
from conftest import make_state, reference_merge, to_f64
from s3_server import SECRET, proxy, s3, s3_server, upload  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

BUCKET = "watch-out"  # a bucket of its own (other test modules upload runs to theirs)
METHODS = ["--method", "sma:n=2", "--method", "ema:alpha=0.3"]
LABELS = ("sma-n2", "ema-alpha0.3")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Default working folders under the test's folder, never the user's ~/.cache."""
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _add(s3, run: Path, step: int, seed: int, url_run: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint written with safetensors into ``run`` (settled: an old mtime), uploaded when ``url_run``."""
    state = make_state(seed, step=step)
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    old = time.time() - 60
    os.utime(folder / "model.safetensors", (old, old))
    if url_run is not None:
        upload(s3, folder, f"{url_run}/checkpoint-{step}")
    if not s3.exists(BUCKET):
        s3.mkdir(BUCKET)
    return state


def _fetch(s3, prefix: str, dest: Path) -> Path:
    """``bucket/prefix/`` downloaded with s3fs into ``dest`` (a fresh folder)."""
    s3.invalidate_cache()
    dest.mkdir(parents=True)
    for key in s3.find(prefix):
        target = dest / key[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.get_file(key, str(target))
    return dest


def _hidden(s3, prefix: str) -> list[str]:
    s3.invalidate_cache()
    parent = prefix.rsplit("/", 1)[0]
    return [k for k in [*s3.find(prefix), *s3.ls(parent, detail=False)] if "/." in k]


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_published_like_local(s3, out_prefix: str, local_out: Path, tmp_path: Path) -> dict[str, Path]:
    """Every method folder in the bucket holds the local watch's files, the weights byte for byte; no temporaries."""
    fetched = {}
    for label in LABELS:
        got = _fetch(s3, f"{out_prefix}/{label}", tmp_path / f"fetched-{time.monotonic_ns()}" / label)
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in (local_out / label).iterdir()), label
        assert _weights(got) == _weights(local_out / label) and _weights(got), label
        fetched[label] = got
    assert not _hidden(s3, out_prefix), _hidden(s3, out_prefix)
    return fetched


@pytest.mark.parametrize("run_at", ["local", "bucket"])
def test_a_watch_publishing_to_a_bucket_equals_the_local_watch_and_the_reference(tmp_path, s3, capsys, cache, run_at):
    run, local_out = tmp_path / "run", tmp_path / "local-watch"
    run_url = f"{BUCKET}/run-{run_at}" if run_at == "bucket" else None
    watched = f"s3://{run_url}" if run_url else str(run)
    out_prefix = f"{BUCKET}/out-{run_at}"
    states = []
    for i in range(3):
        step = 100 * (i + 1)
        states.append(_add(s3, run, step, seed=i, url_run=run_url))
        assert main(["watch", watched, "-o", f"s3://{out_prefix}", *METHODS, "--once", "--settle-s", "0"]) == 0
        printed = capsys.readouterr().out
        assert f"step {step} -> sma-n2, ema-alpha0.3 in s3://{out_prefix}" in printed and SECRET not in printed, printed
        assert f"working folder {cache / 'watch'}" in printed, printed
        assert main(["watch", watched, "-o", str(local_out), *METHODS, "--once", "--settle-s", "0"]) == 0
        fetched = _assert_published_like_local(s3, out_prefix, local_out, tmp_path)

        sma = _tensors(fetched["sma-n2"])
        window = states[-2:]
        for name, value in reference_merge(window, [1 / len(window)] * len(window)).items():
            np.testing.assert_allclose(to_f64(sma[name]), value, rtol=1e-6, atol=1e-6, err_msg=name)
        ema = _tensors(fetched["ema-alpha0.3"])
        coeffs = compute_coeffs("ema", discover(run).checkpoints, alpha=0.3)
        for name, value in reference_merge(states, coeffs).items():
            np.testing.assert_allclose(to_f64(ema[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
        manifest = json.loads((fetched["sma-n2"] / "merge.json").read_text())
        assert [Path(str(i["path"])).name for i in manifest["inputs"]][-1] == f"checkpoint-{step}"

    (work,) = (cache / "watch").iterdir()  # the working folder: state, EMA states; nothing of it in the bucket
    state = json.loads((work / ".watch-state.json").read_text())
    assert state["settings"]["output"] == f"s3://{out_prefix}"
    assert state["published"] == {"sma-n2": 300, "ema-alpha0.3": 300}
    assert (work / ".state" / "ema-alpha0.3").is_dir()
    s3.invalidate_cache()
    assert sorted(k.rsplit("/", 1)[-1] for k in s3.ls(out_prefix)) == sorted(LABELS)
    secret = SECRET.encode()  # in no object published, no file of the working folder
    assert not [k for k in s3.find(out_prefix) if secret in s3.cat_file(k)]
    assert not [p for p in work.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_watch_killed_between_its_rewrite_and_its_upload_republishes_on_restart(tmp_path, s3, monkeypatch, capsys):
    import ckptmerge.online.watch as watch_module

    run, local_out, out = tmp_path / "run", tmp_path / "local-watch", f"{BUCKET}/out-killed"
    argv = ["watch", str(run), "-o", f"s3://{out}", *METHODS, "--once", "--settle-s", "0"]
    for i in range(2):
        _add(s3, run, 100 * (i + 1), seed=i)
        assert main(argv) == 0
    _add(s3, run, 300, seed=2)
    before = _tensors(_fetch(s3, f"{out}/sma-n2", tmp_path / "before"))

    class Killed(BaseException):  # not an Exception: nothing in the watch catches it, as with SIGKILL
        pass

    def killed(url, work_dir, item):
        raise Killed(item.name)

    original = watch_module.publish
    monkeypatch.setattr(watch_module, "publish", killed)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(watch_module, "publish", original)
    (work,) = (tmp_path / "cache" / "watch").iterdir()
    state = json.loads((work / ".watch-state.json").read_text())
    assert {m: p["done_through"] for m, p in state["methods"].items()} == {"sma-n2": 300, "ema-alpha0.3": 300}
    assert state["published"] == {"sma-n2": 200, "ema-alpha0.3": 200}  # rewritten locally, not uploaded
    _assert_bitwise(_tensors(_fetch(s3, f"{out}/sma-n2", tmp_path / "still")), before)  # the bucket: step 200

    capsys.readouterr()
    assert main(argv) == 0  # nothing new in the run: the restart only publishes what the state lacks
    assert " -> " not in capsys.readouterr().out  # no checkpoint taken, no merge: only the uploads
    assert main(["watch", str(run), "-o", str(local_out), *METHODS, "--once", "--settle-s", "0"]) == 0
    _assert_published_like_local(s3, out, local_out, tmp_path)
    assert json.loads((work / ".watch-state.json").read_text())["published"] == {"sma-n2": 300, "ema-alpha0.3": 300}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_sigkill_mid_upload_then_restart_leaves_the_bucket_equal_to_the_local_watch(tmp_path, s3, proxy):
    run, local_out, out = tmp_path / "run", tmp_path / "local-watch", f"{BUCKET}/out-sigkill"
    argv = ["watch", str(run), "-o", f"s3://{out}", *METHODS, "--once", "--settle-s", "0"]
    _add(s3, run, 100, seed=0)
    assert main(argv) == 0
    _add(s3, run, 200, seed=1)
    proxy.delay_puts = 0.5  # each PUT takes half a second: time to kill the watch halfway through an upload
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1] / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-m", "ckptmerge", *argv], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not [k for k in _hidden(s3, out) if ".tmp-" in k and "watch-probe" not in k]:
        assert child.poll() is None and time.monotonic() < deadline, "the watch ended before it was killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    proxy.delay_puts = 0.0
    assert _hidden(s3, out)  # the killed upload's temporary

    assert main(argv) == 0  # removes (or finishes) the dead watch's temporary, then publishes what it lacks
    assert main(["watch", str(run), "-o", str(local_out), *METHODS, "--once", "--settle-s", "0"]) == 0
    _assert_published_like_local(s3, out, local_out, tmp_path)


def _error_lines(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.strip() and " warning: " not in line], captured.out


def test_a_denied_upload_is_reported_retried_and_once_exits_2(tmp_path, s3, proxy, capsys):
    run, local_out, out = tmp_path / "run", tmp_path / "local-watch", f"{BUCKET}/out-denied"
    argv = ["watch", str(run), "-o", f"s3://{out}", *METHODS, "--once", "--settle-s", "0"]
    _add(s3, run, 100, seed=0)
    proxy.deny = lambda method, path: method in ("PUT", "POST") and "/.sma-n2.tmp-" in path
    assert main(argv) == 2
    err, printed = _error_lines(capsys)
    reported = [line for line in printed.splitlines() if "not published" in line]
    assert len(reported) == 1 and reported[0].startswith("watch: sma-n2 not published (s3://watch-out/out-denied/"), printed
    assert "access denied to write in bucket 'watch-out'" in reported[0] and "retried at the next poll" in reported[0]
    assert len(err) == 1 and "sma-n2 not published to s3://watch-out/out-denied" in err[0], err
    assert SECRET not in printed + err[0]
    s3.invalidate_cache()
    assert not s3.exists(f"{out}/sma-n2") and s3.exists(f"{out}/ema-alpha0.3/merge.json")  # the EMA went on
    assert not _hidden(s3, out)

    proxy.deny = lambda method, path: False  # the policy is fixed: the next watch publishes what was missing
    assert main(argv) == 0
    assert main(["watch", str(run), "-o", str(local_out), *METHODS, "--once", "--settle-s", "0"]) == 0
    _assert_published_like_local(s3, out, local_out, tmp_path)


@pytest.mark.parametrize("case", ["missing-bucket", "denied-write", "wrong-endpoint", "not-ours"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, s3, proxy, capsys, monkeypatch,
                                                                      cache, case):
    run = tmp_path / "run"
    _add(s3, run, 100, seed=0)
    output = f"s3://{BUCKET}/out-{case}"
    if case == "missing-bucket":
        output = "s3://no-such-watch-bucket/out"
    elif case == "denied-write":
        proxy.deny = lambda method, path: method in ("PUT", "POST") and "out-denied-write" in path
    elif case == "wrong-endpoint":
        monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps({
            "endpoint_url": "http://127.0.0.1:9", "key": "k-123", "secret": SECRET,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}))
    else:
        s3.pipe_file(f"{BUCKET}/out-not-ours/keep.txt", b"someone else's")
    assert main(["watch", str(run), "-o", output, *METHODS, "--once", "--settle-s", "0"]) == 2
    err, printed = _error_lines(capsys)
    assert len(err) == 1 and printed == "", (err, printed)
    line = err[0]
    expected = {"missing-bucket": "bucket 'no-such-watch-bucket' does not exist (list)",
                "denied-write": "access denied to write in bucket 'watch-out'",
                "wrong-endpoint": "cannot list (EndpointConnectionError",
                "not-ours": "holds 1 object(s) but the working folder"}[case]
    assert line.startswith(f"ckptmerge watch: error: {output}") and expected in line, line
    assert SECRET not in line
    assert not (cache / "watch").exists()  # no working folder, nothing merged
    s3.invalidate_cache()
    if case != "missing-bucket":
        assert [k for k in s3.find(f"{BUCKET}/out-{case}") if not k.endswith("keep.txt")] == []


def test_work_dir_flag_resumes_and_refuses_another_output(tmp_path, s3, capsys):
    run, work = tmp_path / "run", tmp_path / "work"
    _add(s3, run, 100, seed=0)
    argv = ["watch", str(run), *METHODS, "--once", "--settle-s", "0", "--work-dir", str(work)]
    assert main([*argv, "-o", f"s3://{BUCKET}/out-flag"]) == 0
    assert f"working folder {work} " in capsys.readouterr().out
    _add(s3, run, 200, seed=1)
    assert main([*argv, "-o", f"s3://{BUCKET}/out-flag"]) == 0  # resumed: the EMA folded 200 into its state
    assert json.loads((work / ".watch-state.json").read_text())["published"]["ema-alpha0.3"] == 200
    assert main([*argv, "-o", f"s3://{BUCKET}/out-other"]) == 2
    err, _ = _error_lines(capsys)
    assert len(err) == 1 and "output='s3://watch-out/out-flag'" in err[0] and "new --work-dir" in err[0], err
    assert main(["watch", str(run), "-o", str(tmp_path / "local"), "--work-dir", str(work), "--once"]) == 2
    err, _ = _error_lines(capsys)
    assert len(err) == 1 and "only for an -o URL" in err[0], err


def test_watch_jsonl_and_the_report_are_published(tmp_path, s3, capsys):
    from test_watch_live import _tiny_llama_run

    pytest.importorskip("matplotlib")
    run, out = tmp_path / "run", f"{BUCKET}/out-report"
    _tiny_llama_run(run, 2)
    data = tmp_path / "held.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    argv = ["watch", str(run), "-o", f"s3://{out}", "--method", "sma:n=2", "--data", str(data), "--tokens", "128",
            "--device", "cpu", "--once", "--settle-s", "0"]
    assert main(argv) == 0
    (work,) = (tmp_path / "cache" / "watch").iterdir()
    s3.invalidate_cache()
    published = s3.cat_file(f"{out}/watch.jsonl")
    assert published == (work / "watch.jsonl").read_bytes()
    assert [json.loads(line)["step"] for line in published.decode().splitlines()] == [10, 20]
    assert "eval/merged/sma-n2/held.txt/loss" in json.loads(published.decode().splitlines()[0])
    capsys.readouterr()
    assert main(["watch", str(run), "-o", f"s3://{out}", "--report"]) == 0
    printed = capsys.readouterr().out
    assert f"uploaded to s3://{out}/report.html" in printed, printed
    s3.invalidate_cache()
    assert s3.cat_file(f"{out}/report.html") == (work / "report.html").read_bytes()
    assert s3.cat_file(f"{out}/report.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


def test_an_idle_poll_sends_no_request_and_a_publish_is_counted(tmp_path, s3, proxy):
    from ckptmerge.online.watch import WatchConfig, Watcher

    run = tmp_path / "run"
    _add(s3, run, 100, seed=0)
    proxy.requests.clear()
    watcher = Watcher(WatchConfig(str(run), f"s3://{BUCKET}/out-idle", methods=["sma:n=2", "ema:alpha=0.3"],
                                  settle_s=0))
    watcher.log = lambda line: None
    start = list(proxy.requests)  # the checks before any work: list, probe written and deleted
    assert [m for m, _, _ in start][-2:] == ["PUT", "DELETE"] and len(start) <= 5, start  # s3fs: LIST, HEAD, LIST
    proxy.requests.clear()
    assert watcher.poll() == [100]
    first = len(proxy.requests)
    for _ in range(2):  # nothing new in a local run: not one request to the store
        proxy.requests.clear()
        assert watcher.poll() == []
        assert proxy.requests == []
    _add(s3, run, 200, seed=1)
    proxy.requests.clear()
    assert watcher.poll() == [200]
    methods = [m for m, _, _ in proxy.requests]
    puts = methods.count("PUT")  # per method: its files and the marker under the temporary, the copies in
    print(f"requests: {len(start)} at start, {first} to publish 2 methods (first), {len(methods)} to replace them "
          f"({puts} PUT, {methods.count('GET')} GET, {methods.count('HEAD')} HEAD, {methods.count('DELETE')} DELETE, "
          f"{methods.count('POST')} POST), 0 per idle poll")
    assert watcher.state.published == {"sma-n2": 200, "ema-alpha0.3": 200}
