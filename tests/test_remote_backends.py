"""The same runs at ``s3://``, ``gs://`` and ``az://``, each against a real server of its API on this machine:
moto (``tests/s3_server.py``), gcp-storage-emulator (``tests/gcs_server.py``) and Azurite
(``tests/azure_server.py``). A backend whose server cannot start skips with the reason.

For each backend: ``inspect`` of the URL prints the local table; ``merge URL --last 2`` to a local folder and to a
URL equals the local merge tensor for tensor and an fp64 NumPy mean (HF safetensors, one checkpoint sharded, and
DCP); an object replaced during the merge, a missing bucket and denied access are one line each, exit 2, nothing
published; ``clean`` removes a killed upload's temporary and finishes a marked commit; no secret is ever printed or
written into ``merge.json``."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from azure_server import azure, azure_server  # noqa: F401 - fixtures
from ckptmerge.cli.main import main
from conftest import make_state, reference_merge, to_f64, write_checkpoint, write_series
from gcs_server import gcs, gcs_server  # noqa: F401 - fixtures
from s3_server import FaultProxy, replace_on_first_read, s3, s3_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BACKENDS = ("s3", "gs", "az")


@dataclass
class Store:
    """One backend's test server: ``fs`` (the test's own filesystem on it) and a bucket (container) to use."""

    protocol: str
    fs: object
    bucket: str
    secret: str
    server: str
    options: callable  # endpoint -> the storage options for it

    def path(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def url(self, key: str) -> str:
        return f"{self.protocol}://{self.bucket}/{key}"

    def upload(self, local, key: str) -> None:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(file), self.path(f"{key}/{file.relative_to(local).as_posix()}"))

    def objects(self, key: str = "") -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(self.fs.find(self.path(key)))
        except FileNotFoundError:
            return []

    def download(self, key: str, local) -> None:
        local.mkdir(parents=True)
        for path in self.objects(key):
            target = local / path[len(self.path(key)):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(path))


@pytest.fixture(params=BACKENDS)
def store(request) -> Store:
    return _store_for(request, request.param)


def _store_for(request, protocol: str) -> Store:
    """The backend's server (started once per module, or skipped with the reason) and a bucket on it."""
    import azure_server as az
    import gcs_server as gs
    import s3_server as s3mod

    fixture, server, module = {"s3": ("s3", "s3_server", s3mod), "gs": ("gcs", "gcs_server", gs),
                               "az": ("azure", "azure_server", az)}[protocol]
    fs = request.getfixturevalue(fixture)
    bucket = f"ckptmerge-{protocol}"
    fs.invalidate_cache()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return Store(protocol, fs, bucket, module.SECRET, request.getfixturevalue(server), module.storage_options)


def _hf_run(tmp_path):
    """Three HF folders ``checkpoint-N`` (the middle one sharded), bf16, with trainer_state.json and a config."""
    run = tmp_path / "hf-run"
    states = [make_state(seed, dtype=torch.bfloat16, step=100 * (seed + 1)) for seed in range(3)]
    for i, (state, layout) in enumerate(zip(states, ("hf-safetensors", "hf-sharded", "hf-safetensors"))):
        step = 100 * (i + 1)
        folder = write_checkpoint(run / f"checkpoint-{step}", state, layout)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": step * 64,
             "log_history": [{"learning_rate": 1e-3 / (i + 1)}]}))
        (folder / "config.json").write_text(json.dumps({"model_type": "test", "torch_dtype": "bfloat16"}))
    return run, states


def _dcp_run(tmp_path):
    run = tmp_path / "dcp-run"
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(3)]
    write_series(run, states, "dcp")
    return run, states


RUNS = {"hf": _hf_run, "dcp": _dcp_run}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _error_line(capsys, secret: str) -> str:
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    err = [line for line in captured.err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_inspect_of_a_url_lists_the_local_steps(tmp_path, store, kind, capsys):
    run, _ = RUNS[kind](tmp_path)
    store.upload(run, f"inspect-{kind}")
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    assert main(["inspect", store.url(f"inspect-{kind}")]) == 0
    remote = capsys.readouterr().out
    if kind == "hf":
        assert remote.splitlines() == local.splitlines()  # names, steps, tokens, lr, dtypes and sizes
    steps = [[line.split()[:2] for line in table.splitlines() if len(line.split()) > 1 and line.split()[1].isdigit()]
             for table in (local, remote)]
    assert steps[0] == steps[1] and len(steps[0]) == 3, (local, remote)
    assert store.secret not in remote


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_merge_of_a_url_equals_the_local_merge_and_the_fp64_mean(tmp_path, store, kind, capsys):
    run, states = RUNS[kind](tmp_path)
    store.upload(run, f"merge-{kind}")
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    local = _tensors(tmp_path / "local-out")
    expected = reference_merge(states[1:], [0.5, 0.5])
    for out in ("local", "url"):
        target = str(tmp_path / "out-local") if out == "local" else store.url(f"merged-{kind}")
        assert main(["merge", store.url(f"merge-{kind}"), "--last", "2", "-o", target, "--quiet"]) == 0, out
        folder = tmp_path / "out-local"
        if out == "url":
            folder = tmp_path / "out-url"
            store.download(f"merged-{kind}", folder)
            assert not [k for k in store.objects() if ".tmp-" in k]  # the commit's temporary is gone
        merged = _tensors(folder)
        assert merged.keys() == local.keys()
        for name in local:
            assert merged[name].dtype == local[name].dtype and torch.equal(merged[name], local[name]), (out, name)
        tol = 1e-2 if kind == "hf" else 1e-6  # bf16 output vs fp32 output
        for name, value in expected.items():
            np.testing.assert_allclose(to_f64(merged[name]), value, rtol=tol, atol=tol)
        manifest = (folder / "merge.json").read_text()
        inputs = json.loads(manifest)["inputs"]
        assert [i["path"] for i in inputs] == [store.url(f"merge-{kind}/{p.name}") for p in sorted(run.iterdir())[1:]]
        assert all(i["content_hash"].startswith("etag-sha256:") for i in inputs)
        assert store.secret not in manifest + capsys.readouterr().out


def test_versions_are_the_stores_own(tmp_path, store):
    """What a merge pins: the ETag on S3 and Azure, the generation on GCS (its ETag changes with metadata too)."""
    from ckptmerge.io.remote import as_location
    from ckptmerge.io.remote_tree import RemoteTree

    store.fs.pipe_file(store.path("versions/a.bin"), b"one")
    before = RemoteTree.list(as_location(store.url("versions"))).object("a.bin").version
    store.fs.pipe_file(store.path("versions/a.bin"), b"two")
    after = RemoteTree.list(as_location(store.url("versions"))).object("a.bin").version
    assert before.startswith({"s3": "etag:", "gs": "generation:", "az": "etag:"}[store.protocol]), before
    assert before != after


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_an_object_replaced_during_the_merge_fails_in_one_line(tmp_path, store, kind, monkeypatch, capsys):
    from ckptmerge.io.remote_dcp import RemoteDcpReader
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    run, _ = RUNS[kind](tmp_path)
    store.upload(run, f"changed-{kind}")
    if kind == "hf":
        other, key, reader = tmp_path / "other.safetensors", "checkpoint-300/model.safetensors", RemoteSafetensorsReader
        save_file({k: v.contiguous() for k, v in make_state(99, dtype=torch.bfloat16).items()}, other)
        original = run / key
    else:
        other, key, reader = tmp_path / "other.distcp", "step-000300/__0_0.distcp", RemoteDcpReader
        other.write_bytes((run / key).read_bytes() + b"\0")  # another version (and size) of the same data
        original = run / key
    replaced = replace_on_first_read(monkeypatch, reader, store.fs, other, store.path(f"changed-{kind}/{key}"))
    for out in (str(tmp_path / "out"), store.url(f"changed-{kind}-out")):
        replaced.clear()
        store.fs.put_file(str(original), store.path(f"changed-{kind}/{key}"))
        assert main(["merge", store.url(f"changed-{kind}"), "--last", "2", "-o", out, "--quiet"]) == 2
        line = _error_line(capsys, store.secret)
        assert replaced and ("checkpoint-300" in line or "step-000300" in line), line
        assert "changed while it was being merged" in line and "nothing was published" in line, line
    assert not (tmp_path / "out").exists()
    assert not store.objects(f"changed-{kind}-out") and not [k for k in store.objects() if f"changed-{kind}-out" in k]


def test_a_missing_bucket_is_one_line_naming_it(store, capsys):
    assert main(["inspect", f"{store.protocol}://ckptmerge-absent-4242/run"]) == 2
    line = _error_line(capsys, store.secret)
    word = "container" if store.protocol == "az" else "bucket"
    assert f"{word} 'ckptmerge-absent-4242' does not exist" in line and "(list)" in line, line


def test_a_missing_bucket_for_the_output_is_one_line(tmp_path, store, capsys):
    run, _ = _hf_run(tmp_path)
    store.upload(run, "nobucket-in")
    target = f"{store.protocol}://ckptmerge-absent-4343/merged"
    assert main(["merge", store.url("nobucket-in"), "--last", "2", "-o", target, "--quiet"]) == 2
    line = _error_line(capsys, store.secret)
    word = "container" if store.protocol == "az" else "bucket"
    assert f"{word} 'ckptmerge-absent-4343' does not exist" in line, line


def test_denied_access_is_one_line_and_publishes_nothing(tmp_path, store, monkeypatch, capsys):
    """Reads and writes answered 403 by a proxy in front of the server: the backend's own error type (botocore's
    AccessDenied, gcsfs' ``OSError('Forbidden')``, azure-core's ``ClientAuthenticationError``) is one line."""
    run, _ = _hf_run(tmp_path)
    store.upload(run, "deny-in")
    proxy = FaultProxy(store.server.split("/devstoreaccount1")[0])
    try:
        endpoint = proxy.endpoint + store.server[len(store.server.split("/devstoreaccount1")[0]):]
        monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(store.options(endpoint)))
        proxy.deny = lambda method, path: method in ("PUT", "POST")  # (gcsfs names an upload in its body)
        assert main(["merge", store.url("deny-in"), "--last", "2", "-o", store.url("denied-out"), "--quiet"]) == 2
        line = _error_line(capsys, store.secret)
        assert "access denied" in line and "write" in line and f"'{store.bucket}'" in line, line
        assert not [k for k in store.objects() if "denied-out" in k]
        proxy.deny = lambda method, path: method == "GET"
        assert main(["inspect", store.url("deny-in")]) == 2
        line = _error_line(capsys, store.secret)
        assert "access denied" in line and "list" in line and f"'{store.bucket}'" in line, line
    finally:
        proxy.stop()


def test_clean_removes_a_killed_uploads_temporary_and_finishes_a_marked_commit(tmp_path, store, capsys):
    from ckptmerge.io.publish import _host_id
    from ckptmerge.io.remote_publish import MARKER

    run, _ = _hf_run(tmp_path)
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "merged"), "--quiet"]) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    half = f"clean/.killed-out.tmp-{dead.pid}-1-{_host_id()}-0badc0de"  # killed while uploading: no marker
    store.fs.put_file(str(tmp_path / "merged" / "model.safetensors"), store.path(f"{half}/model.safetensors"))
    marked = f"clean/.finished-out.tmp-{dead.pid}-1-{_host_id()}-0badc0df"  # killed while copying in
    store.upload(tmp_path / "merged", marked)
    store.fs.pipe_file(store.path(f"{marked}/{MARKER}"), b"{}")
    store.fs.pipe_file(store.path("clean/finished-out/model.safetensors"), b"half-copied old bytes")
    assert main(["clean", store.url("clean/killed-out")]) == 0
    assert f"removed {store.url(half)}" in capsys.readouterr().out
    assert main(["clean", store.url("clean/finished-out")]) == 0
    assert f"finished the commit of {store.url('clean/finished-out')}" in capsys.readouterr().out
    store.download("clean/finished-out", tmp_path / "fetched")
    names = [sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in ("fetched", "merged")]
    assert names[0] == names[1]
    merged, fetched = _tensors(tmp_path / "merged"), _tensors(tmp_path / "fetched")
    assert merged.keys() == fetched.keys() and all(torch.equal(merged[k], fetched[k]) for k in merged)
    assert not [k for k in store.objects("clean") if ".tmp-" in k]


@pytest.mark.parametrize("alias", ["gcs", "abfs"])
def test_the_other_url_forms_of_a_store_read_the_same_run(tmp_path, alias, capsys, request):
    protocol = {"gcs": "gs", "abfs": "az"}[alias]
    store = _store_for(request, protocol)
    run, _ = _hf_run(tmp_path)
    store.upload(run, f"alias-{alias}")
    assert main(["inspect", store.url(f"alias-{alias}")]) == 0
    canonical = capsys.readouterr().out
    assert main(["inspect", f"{alias}://{store.bucket}/alias-{alias}"]) == 0
    assert capsys.readouterr().out.replace(f"{alias}://", f"{protocol}://") == canonical



def test_redact_blanks_a_connection_strings_key_alone(monkeypatch):
    """An Azure connection string is one option value; an error that quotes only its AccountKey must not show it."""
    from azure_server import KEY, storage_options
    from ckptmerge.io.remote import redact

    options = storage_options("http://127.0.0.1:10000/devstoreaccount1")
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(options))
    assert redact(f"signature did not match; key {KEY} for devstoreaccount1") == (
        "signature did not match; key *** for devstoreaccount1")


@pytest.mark.parametrize("protocol, extra", [("gs", "gcs"), ("gcs", "gcs"), ("az", "azure"), ("abfs", "azure")])
def test_a_missing_backend_is_one_line_naming_the_extra(protocol, extra, monkeypatch, capsys):
    import sys

    import fsspec.registry  # noqa: F401 - its module (``fsspec.registry`` the attribute is a read-only view)

    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.delitem(registry, protocol, raising=False)
    for module in ("gcsfs", "adlfs"):
        monkeypatch.setitem(sys.modules, module, None)  # `import gcsfs` raises ImportError
    monkeypatch.delenv("CKPTMERGE_STORAGE_OPTIONS", raising=False)
    assert main(["inspect", f"{protocol}://bucket/run"]) == 2
    line = _error_line(capsys, "no secret here")
    assert line.endswith(f"the {protocol}:// backend is not installed: pip install 'ckptmerge[{extra}]'"), line


def test_a_wrong_azure_key_is_access_denied_in_one_line(tmp_path, request, monkeypatch, capsys):
    """Azurite checks the shared-key signature as Azure does: another key is refused (403), one line, key not shown."""
    import base64

    from azure_server import KEY

    store = _store_for(request, "az")
    run, _ = _hf_run(tmp_path)
    store.upload(run, "wrong-key")
    wrong = base64.b64encode(b"not the account key, 64 bytes long......................").decode()
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(store.options(store.server)).replace(KEY, wrong))
    assert main(["inspect", store.url("wrong-key")]) == 2
    line = _error_line(capsys, wrong)
    assert "access denied to list in container 'ckptmerge-az'" in line and KEY not in line, line


@pytest.mark.parametrize("protocol", ["gs", "az"])
def test_a_refusing_server_is_one_line_on_stderr_in_a_fresh_process(tmp_path, protocol):
    """gcsfs logs a traceback before it raises a non-retriable error (``logger.exception``); in a process whose
    logging nobody configured, Python prints it: the CLI's stderr must still be the one error line. A server that
    answers every request 401 (JSON, as GCS does) stands in for a store that refuses the credentials."""
    import http.server
    import os
    import sys
    import threading
    from pathlib import Path

    import azure_server as az
    import gcs_server as gs

    class Refuse(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _refuse(self):
            body = json.dumps({"error": {"code": 401, "message": "Login Required"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if self.command != "HEAD" else b"")

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    options = gs.storage_options(endpoint) if protocol == "gs" else az.storage_options(f"{endpoint}/{az.ACCOUNT}")
    env = {**os.environ, "CKPTMERGE_STORAGE_OPTIONS": json.dumps(options), gs.ZB_HNS_ENV: "false",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    try:
        done = subprocess.run([sys.executable, "-m", "ckptmerge", "inspect", f"{protocol}://refused/run"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "access denied to list in" in lines[0] and gs.SECRET not in done.stderr and az.KEY not in done.stderr
