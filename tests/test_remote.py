"""Runs that live in an object store (issue 25): inspect and merge ``s3://`` runs served by a real S3 API
server on this machine (moto, ``tests/s3_server.py``), compared tensor-for-tensor with the local merge of the
same files and with an fp64 NumPy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmerge.cli.main import main
from conftest import make_state, reference_merge, to_f64, tree_digest, write_checkpoint
from s3_server import SECRET, proxy, replace_on_first_read, s3, s3_server, upload  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(tmp_path, layouts=("hf-safetensors", "hf-sharded", "hf-safetensors", "hf-safetensors")):
    """Four HF folders ``checkpoint-N`` (one of them sharded) with trainer_state.json and a config."""
    run = tmp_path / "run"
    states = [make_state(seed, dtype=torch.bfloat16, step=100 * (seed + 1)) for seed in range(len(layouts))]
    for i, (state, layout) in enumerate(zip(states, layouts)):
        step = 100 * (i + 1)
        folder = write_checkpoint(run / f"checkpoint-{step}", state, layout)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": step * 64, "log_history": [{"learning_rate": 1e-3 / (i + 1)}]}))
        (folder / "config.json").write_text(json.dumps({"model_type": "test", "torch_dtype": "bfloat16"}))
    return run, states


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_inspect_of_a_bucket_lists_the_local_steps(tmp_path, s3, capsys):
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/inspect")
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    assert main(["inspect", "s3://runs/inspect"]) == 0
    remote = capsys.readouterr().out
    assert local.splitlines() == remote.splitlines()  # same names, steps, tokens, lr, dtypes and sizes
    assert "checkpoint-400" in remote and "4 checkpoints" in remote


@pytest.mark.parametrize("out_kind", ["local", "s3"])
def test_merge_from_s3_equals_the_local_merge(tmp_path, s3, out_kind, capsys):
    run, states = _run(tmp_path)
    upload(s3, run, "runs/merge")
    assert main(["merge", str(run), "--last", "3", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    out = str(tmp_path / "remote-out") if out_kind == "local" else f"s3://runs/merged-{out_kind}"
    assert main(["merge", "s3://runs/merge", "--last", "3", "-o", out, "--quiet", "--io-concurrency", "3"]) == 0
    if out_kind == "s3":
        (tmp_path / "remote-out").mkdir()
        s3.get(f"runs/merged-{out_kind}/", str(tmp_path / "remote-out") + "/", recursive=True)
    local, remote = _tensors(tmp_path / "local-out"), _tensors(tmp_path / "remote-out")
    assert local.keys() == remote.keys()
    for name in local:
        assert local[name].dtype == remote[name].dtype and torch.equal(local[name], remote[name]), name
    expected = reference_merge(states[1:], [1 / 3] * 3)
    for name, value in expected.items():
        np.testing.assert_allclose(to_f64(remote[name]), value, rtol=1e-2, atol=1e-2)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://runs/merge/checkpoint-{s}" for s in (200, 300, 400)]
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])
    assert json.loads((tmp_path / "remote-out" / "config.json").read_text())["model_type"] == "test"
    assert SECRET not in (tmp_path / "remote-out" / "merge.json").read_text() + capsys.readouterr().out


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert SECRET not in err[0]
    return err[0]


def _count_requests(monkeypatch) -> list[tuple[str, int, int]]:
    """Every range request the remote readers make: (object URL, offset, bytes)."""
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    asked, original = [], RemoteSafetensorsReader._range

    def counted(self, obj, offset, nbytes):
        asked.append((str(obj.url), offset, nbytes))
        return original(self, obj, offset, nbytes)

    monkeypatch.setattr(RemoteSafetensorsReader, "_range", counted)
    return asked


def test_every_input_byte_is_requested_once_by_ranges(tmp_path, s3, monkeypatch):
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/bytes")
    asked = _count_requests(monkeypatch)
    assert main(["merge", "s3://runs/bytes", "--last", "3", "-o", str(tmp_path / "out"), "--quiet",
                 "--chunk-size", "256"]) == 0
    sizes = {f"s3://{k}": v["size"] for k, v in s3.find("runs/bytes", detail=True).items() if k.endswith(".safetensors")}
    window = {u: n for u, n in sizes.items() if "checkpoint-100" not in u}
    assert sum(n for _, _, n in asked) == sum(window.values())  # bytes requested / input bytes = 1.00
    covered = {}
    for url, offset, nbytes in asked:
        covered.setdefault(url, []).append((offset, offset + nbytes))
    for url, ranges in covered.items():  # disjoint ranges that tile each object exactly
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == window[url]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), url


def test_an_object_replaced_during_the_merge_fails_and_publishes_nothing(tmp_path, s3, monkeypatch, capsys):
    from safetensors.torch import save_file

    run, _ = _run(tmp_path)
    upload(s3, run, "runs/changed")
    save_file({k: v.contiguous() for k, v in make_state(99, dtype=torch.bfloat16).items()}, tmp_path / "other.safetensors")
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    replaced = replace_on_first_read(monkeypatch, RemoteSafetensorsReader, s3, tmp_path / "other.safetensors",
                                     "runs/changed/checkpoint-400/model.safetensors")
    for out in (str(tmp_path / "out"), "s3://runs/changed-out"):
        replaced.clear()
        s3.put_file(str(run / "checkpoint-400" / "model.safetensors"), "runs/changed/checkpoint-400/model.safetensors")
        assert main(["merge", "s3://runs/changed", "--last", "3", "-o", out, "--quiet", "--chunk-size", "256"]) == 2
        line = _error_line(capsys)
        assert "checkpoint-400" in line and "changed while it was being merged" in line, line
    assert not (tmp_path / "out").exists()
    assert not s3.find("runs/changed-out") and not [k for k in s3.ls("runs") if ".changed-out.tmp-" in k]


def test_a_missing_bucket_is_one_line(s3, capsys):
    assert main(["inspect", "s3://no-such-bucket/run"]) == 2
    line = _error_line(capsys)
    assert "no-such-bucket" in line and "does not exist" in line, line


def test_a_wrong_endpoint_is_one_line(tmp_path, s3, monkeypatch, capsys):
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps({
        "endpoint_url": "http://127.0.0.1:9", "key": "k-123", "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}))
    assert main(["merge", "s3://runs/anything", "--last", "2", "-o", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "s3://runs/anything" in line and "cannot list" in line and "EndpointConnectionError" in line, line
    assert not (tmp_path / "out").exists()


def test_a_denied_write_is_one_line_and_leaves_nothing(tmp_path, s3, proxy, capsys):
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/deny")
    proxy.deny = lambda method, path: method in ("PUT", "POST") and "denied-out" in path
    assert main(["merge", "s3://runs/deny", "--last", "2", "-o", "s3://runs/denied-out", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "access denied" in line and "'runs'" in line and "write" in line, line
    assert not s3.find("runs/denied-out") and not [k for k in s3.ls("runs") if "denied-out" in k]


def test_bad_storage_options_are_one_line(s3, monkeypatch, capsys):
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", '{"secret": "' + SECRET + '"')  # cut short
    assert main(["inspect", "s3://runs/x"]) == 2
    assert "not a JSON object" in _error_line(capsys)


def _objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(prefix))


def test_sigkill_during_upload_leaves_no_destination_and_clean_removes_the_rest(tmp_path, s3, proxy, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    run, _ = _run(tmp_path)
    upload(s3, run, "runs/kill")
    proxy.delay_puts = 0.5  # the upload takes seconds: time to kill it halfway
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-m", "ckptmerge", "merge", "s3://runs/kill", "--last", "3",
                              "-o", "s3://runs/killed-out", "--quiet"], env=env)
    deadline = time.monotonic() + 60
    while not [k for k in _objects(s3, "runs") if ".killed-out.tmp-" in k] and time.monotonic() < deadline:
        assert child.poll() is None, "the merge ended before it was killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = [k for k in _objects(s3, "runs") if ".killed-out.tmp-" in k]
    assert leftovers and not _objects(s3, "runs/killed-out")  # no destination, only the temporary
    assert main(["clean", "s3://runs/killed-out"]) == 0
    assert "removed s3://runs/.killed-out.tmp-" in capsys.readouterr().out
    assert not [k for k in _objects(s3, "runs") if "killed-out" in k]


def test_clean_finishes_a_commit_that_a_killed_run_had_marked(tmp_path, s3, capsys):
    import subprocess

    from ckptmerge.io.publish import _host_id
    from ckptmerge.io.remote_publish import MARKER

    run, _ = _run(tmp_path)
    upload(s3, run, "runs/commit")
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "merged"), "--quiet"]) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = f"runs/.finished-out.tmp-{dead.pid}-1-{_host_id()}-0badc0de"
    upload(s3, tmp_path / "merged", tmp)
    s3.pipe_file(f"{tmp}/{MARKER}", b"{}")
    s3.pipe_file("runs/finished-out/model.safetensors", b"half-copied old bytes")  # killed while copying in
    assert main(["clean", "s3://runs/finished-out"]) == 0
    assert "finished the commit of s3://runs/finished-out" in capsys.readouterr().out
    (tmp_path / "fetched").mkdir()
    s3.get("runs/finished-out/", str(tmp_path / "fetched") + "/", recursive=True)
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == sorted(p.name for p in (tmp_path / "merged").iterdir())
    for name, value in _tensors(tmp_path / "merged").items():
        assert torch.equal(value, _tensors(tmp_path / "fetched")[name])
    assert not [k for k in _objects(s3, "runs") if ".finished-out.tmp-" in k]


def test_an_existing_destination_is_refused_without_force(tmp_path, s3, capsys):
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/exists")
    s3.pipe_file("runs/exists-out/keep.txt", b"not ours")
    assert main(["merge", "s3://runs/exists", "--last", "2", "-o", "s3://runs/exists-out", "--quiet"]) == 2
    assert "already exists" in _error_line(capsys) and _objects(s3, "runs/exists-out") == ["runs/exists-out/keep.txt"]
    assert main(["merge", "s3://runs/exists", "--last", "2", "-o", "s3://runs/exists-out", "--quiet", "--force"]) == 0
    assert "runs/exists-out/keep.txt" not in _objects(s3, "runs/exists-out")
    assert "runs/exists-out/merge.json" in _objects(s3, "runs/exists-out")


@pytest.mark.parametrize("drop", [False, True], ids=["http-500", "dropped-connection"])
def test_a_flaky_server_is_retried_and_the_merge_is_still_exact(tmp_path, s3, proxy, monkeypatch, drop):
    from s3_server import storage_options

    run, _ = _run(tmp_path)
    upload(s3, run, "runs/flaky")
    assert main(["merge", str(run), "--last", "3", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(storage_options(proxy.endpoint)))
    proxy.fail_every, proxy.drop = 4, drop  # one request in four fails; the backend's own retries take over
    assert main(["merge", "s3://runs/flaky", "--last", "3", "-o", str(tmp_path / "out"), "--quiet",
                 "--chunk-size", "256"]) == 0
    local, remote = _tensors(tmp_path / "local-out"), _tensors(tmp_path / "out")
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    assert sum(1 for _ in proxy.requests) >= 4


def test_redact_blanks_secrets_and_keeps_the_endpoint(monkeypatch):
    from ckptmerge.io.remote import redact

    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(
        {"endpoint_url": "http://minio:9000", "key": "AKIA-ID", "secret": SECRET, "client_kwargs": {"token": "tok-123"}}))
    text = redact(f"failed at http://minio:9000 with AKIA-ID / {SECRET} / tok-123 via https://user:pw@host/x")
    assert text == "failed at http://minio:9000 with *** / *** / *** via https://***@host/x"


def test_eval_of_an_s3_checkpoint_on_s3_data_equals_the_local_eval(tmp_path, s3, monkeypatch):
    from bpe_model import sentences, train_run

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "evalrun"
    train_run(run, steps=(2, 4))
    (run / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(7, 60)))
    upload(s3, run, "runs/eval")
    results = {}
    for where, model, data in (("local", run / "checkpoint-4", run / "held.jsonl"),
                               ("s3", "s3://runs/eval/checkpoint-4", "s3://runs/eval/held.jsonl")):
        out = tmp_path / f"{where}.json"
        assert main(["eval", str(model), "--data", str(data), "--tokens", "400", "--quiet", "--json", str(out)]) == 0
        (by_data,) = json.loads(out.read_text()).values()
        (results[where],) = by_data.values()
        assert results[where].pop("data") == str(data)
    assert results["s3"] == results["local"]  # loss, standard error, tokens, bytes: all equal
    assert results["s3"]["tokens"] > 0
    from ckptmerge.evaluation.api import evaluate  # cm.evaluate: a URL is read from the store, not as a local path

    (by_data,) = evaluate(["s3://runs/eval/checkpoint-4"], ["s3://runs/eval/held.jsonl"], n_tokens=400).values()
    (result,) = by_data.values()
    assert {k: v for k, v in result.to_dict().items() if k != "data"} == results["local"]


def test_as_checkpoint_from_a_url_equals_the_local_hand_back(tmp_path, s3):
    """The hand-back of a run at a URL (the newest folder's trainer state beside the merged weights) holds the same
    files, byte for byte, as the hand-back of the same run on local disk (merge.json aside: it names the inputs)."""
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/handback")
    assert main(["merge", "s3://runs/handback", "--last", "2", "-o", str(tmp_path / "out"), "--as-checkpoint"]) == 0
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "local"), "--as-checkpoint"]) == 0
    remote, local = tree_digest(tmp_path / "out"), tree_digest(tmp_path / "local")
    assert "trainer_state.json" in local and set(remote) == set(local)
    assert {k: v for k, v in remote.items() if k != "merge.json"} == {k: v for k, v in local.items() if k != "merge.json"}


def _tokenizer_run(tmp_path, s3, prefix: str):
    """An HF run (BPE tokenizer in each checkpoint), its tokenizer alone at s3://runs/PREFIX/tok, and held-out text
    (JSONL and a token .bin with its sidecar) both local and at s3://runs/PREFIX/."""
    from bpe_model import sentences, train_run

    train_run(tmp_path / "run", steps=(2, 4))
    data = tmp_path / "data"
    data.mkdir()
    (data / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(7, 60)))
    assert main(["data", "tokenize", str(data / "held.jsonl"), "--tokenizer", str(tmp_path / "run" / "checkpoint-4"),
                 "-o", str(data / "held.bin"), "--quiet"]) == 0
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "run" / "checkpoint-4" / name).is_file():
            (tok / name).write_bytes((tmp_path / "run" / "checkpoint-4" / name).read_bytes())
    upload(s3, tok, f"runs/{prefix}/tok")
    upload(s3, data, f"runs/{prefix}/data")
    return tmp_path / "run", data, tok


def _eval_json(argv, out) -> dict:
    assert main([*argv, "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for by_data in report.values():
        for result in by_data.values():
            result.pop("data")
    return report


def test_eval_with_a_tokenizer_and_data_at_urls_equals_the_local_eval(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run, data, tok = _tokenizer_run(tmp_path, s3, "tok-eval")
    model = str(run / "checkpoint-4")
    cases = {"folder": ("s3://runs/tok-eval/tok", str(tok)),
             "tokenizer.json": ("s3://runs/tok-eval/tok/tokenizer.json", str(tok / "tokenizer.json"))}
    for what, (remote_tok, local_tok) in cases.items():
        for name in ("held.jsonl", "held.bin"):
            local = _eval_json(["eval", model, "--tokenizer", local_tok, "--data", str(data / name), "--tokens", "400"],
                               tmp_path / "local.json")
            remote = _eval_json(["eval", model, "--tokenizer", remote_tok, "--data", f"s3://runs/tok-eval/data/{name}",
                                 "--tokens", "400"], tmp_path / "remote.json")
            (local_result,), (remote_result,) = (next(iter(r.values())).values() for r in (local, remote))
            assert remote_result == local_result, (what, name)  # loss, SE, tokens and bytes all equal
            assert local_result["tokens"] > 0 and local_result["bytes"] > 0
    cached = list((tmp_path / "cache" / "remote").rglob("held.bin.json"))
    assert cached and json.loads(cached[0].read_text()) == json.loads((data / "held.bin.json").read_text())


def test_a_tokenizer_url_without_tokenizer_files_is_one_line(tmp_path, s3, monkeypatch, capsys):
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run, _, _ = _tokenizer_run(tmp_path, s3, "tok-none")
    assert main(["eval", str(run / "checkpoint-4"), "--tokenizer", "s3://runs/tok-none/data", "--data",
                 "s3://runs/tok-none/data/held.jsonl", "--tokens", "400", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "--tokenizer s3://runs/tok-none/data: no tokenizer files there" in line, line


def test_search_on_data_and_a_tokenizer_at_urls_equals_the_local_search(tmp_path, s3, monkeypatch, capsys):
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run, data, tok = _tokenizer_run(tmp_path, s3, "tok-search")
    results = {}
    for where, tok_arg, data_arg in (("local", str(tok), str(data / "held.jsonl")),
                                     ("s3", "s3://runs/tok-search/tok", "s3://runs/tok-search/data/held.jsonl")):
        out = tmp_path / f"{where}.json"
        assert main(["search", str(run / "checkpoint-2"), str(run / "checkpoint-4"), "--space", "pair", "--trials", "4",
                     "--sampler", "random", "--seed", "3", "--data", data_arg, "--tokenizer", tok_arg, "--tokens", "400",
                     "--device", "cpu", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        results[where] = (report["trials"], list(report["generalization"].values()), report["best_loss"])
    capsys.readouterr()
    assert results["s3"] == results["local"]  # weights, losses, SEs, bits per byte, the generalization table
    assert len(results["local"][0]) == 4 and all(t["bits_per_byte"] for t in results["local"][0])


def test_a_dcp_run_on_s3_inspects_and_merges_like_the_local_copy(tmp_path, s3, capsys, monkeypatch):
    from conftest import write_series

    run = tmp_path / "dcp-run"
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(3)]
    write_series(run, states, "dcp")
    upload(s3, run, "runs/dcp")
    assert main(["inspect", str(run)]) == 0
    local_table = capsys.readouterr().out
    assert main(["inspect", "s3://runs/dcp"]) == 0
    remote_table = capsys.readouterr().out
    steps = [[line.split()[:2] for line in table.splitlines() if line.split()[:1] and line.split()[1:2] and
              line.split()[1].isdigit()] for table in (local_table, remote_table)]
    assert steps[0] == steps[1] and len(steps[0]) == 3, (local_table, remote_table)
    asked = []
    from ckptmerge.io.remote_dcp import RemoteDcpReader

    original = RemoteDcpReader._read_range
    monkeypatch.setattr(RemoteDcpReader, "_read_range", lambda self, f, start, n: asked.append((str(f), start, n))
                        or original(self, f, start, n))
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    assert main(["merge", "s3://runs/dcp", "--last", "2", "-o", "s3://runs/dcp-merged", "--quiet"]) == 0
    (tmp_path / "remote-out").mkdir()
    s3.get("runs/dcp-merged/", str(tmp_path / "remote-out") + "/", recursive=True)
    local, remote = _tensors(tmp_path / "local-out"), _tensors(tmp_path / "remote-out")
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    for name, value in reference_merge(states[1:], [0.5, 0.5]).items():  # fp64 NumPy, independent of ckptmerge
        np.testing.assert_allclose(to_f64(remote[name]), value, rtol=1e-6, atol=1e-6)
    assert asked and all(url.endswith(".distcp") for url, _, _ in asked)  # chunks by range, never whole objects
    sizes = {f"s3://{k}": v["size"] for k, v in s3.find("runs/dcp", detail=True).items()}
    assert all(n < sizes[url] for url, _, n in asked)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])


def test_sweep_on_data_and_a_tokenizer_at_urls_equals_the_local_sweep(tmp_path, s3, monkeypatch, capsys):
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run, data, tok = _tokenizer_run(tmp_path, s3, "tok-sweep")
    reports = {}
    for where, tok_arg, data_arg in (("local", str(tok), str(data / "held.jsonl")),
                                     ("s3", "s3://runs/tok-sweep/tok", "s3://runs/tok-sweep/data/held.jsonl")):
        out = tmp_path / f"sweep-{where}"
        assert main(["sweep", str(run), "--data", data_arg, "--tokenizer", tok_arg, "--method", "sma", "--last", "2",
                     "--every", "2", "--at", "4", "--tokens", "400", "--device", "cpu", "-o", str(out), "--quiet"]) == 0
        reports[where] = json.loads((out / "report.json").read_text().replace(data_arg, "DATA"))
    capsys.readouterr()
    for report in reports.values():
        report.pop("config", None)
    assert reports["s3"] == reports["local"]  # every row's loss, SE, bits per byte and tokens
    assert [r["recipe"] for r in reports["local"]["rows"]] == ["raw", "sma N=2 V=2"]
    assert all(r["tokens"]["DATA"] > 0 for r in reports["local"]["rows"])
