"""Torch pickles at URLs (``pytorch_model.bin`` HF folders, sharded ``.bin``, single ``.pt`` files): inspected,
merged and evaluated from a real S3 API server (moto, ``tests/s3_server.py``) by byte ranges, compared with the
local reading of the same files and with an fp64 NumPy reference; forbidden globals and legacy files refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmerge.cli.main import main
from conftest import make_state, reference_merge, to_f64, write_checkpoint
from s3_server import SECRET, proxy, replace_on_first_read, s3, s3_server, upload  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _write_sharded_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """An HF sharded torch checkpoint: two ``pytorch_model-0000x-of-00002.bin`` files and their index."""
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k].contiguous() for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _hf_bin_run(tmp_path: Path, dtype=torch.bfloat16):
    """Four HF folders ``checkpoint-N`` of ``pytorch_model.bin`` (the second sharded), trainer_state and config."""
    run = tmp_path / "binrun"
    states = [make_state(seed, dtype=dtype, step=100 * (seed + 1)) for seed in range(4)]
    for i, state in enumerate(states):
        step, folder = 100 * (i + 1), run / f"checkpoint-{100 * (i + 1)}"
        if i == 1:
            _write_sharded_bin(folder, state)
        else:
            write_checkpoint(folder, state, "hf-bin")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": step * 64, "log_history": [{"learning_rate": 1e-3 / (i + 1)}]}))
        (folder / "config.json").write_text(json.dumps({"model_type": "test", "torch_dtype": "bfloat16"}))
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")  # a trainer's file beside the weights
    return run, states


def _pt_run(tmp_path: Path, states=None):
    """Single ``step-N.pt`` files: the model under ``model`` with DDP and compile prefixes, an optimizer beside."""
    run = tmp_path / "ptrun"
    states = states or [make_state(seed, step=100 * (seed + 1)) for seed in range(4)]
    run.mkdir(parents=True)
    for i, state in enumerate(states):
        write_checkpoint(run / f"step-{100 * (i + 1):06d}", state, "pt-nested")
    return run, states


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert SECRET not in err[0] and "Traceback" not in captured.err
    return err[0]


def _fetch(s3, url_path: str, dest: Path) -> Path:
    dest.mkdir()
    s3.get(f"{url_path}/", str(dest) + "/", recursive=True)
    return dest


def _manifest_without_locations(folder: Path) -> dict:
    """merge.json less what must differ: the input and output locations, the content hashes (sampled bytes
    locally, ETags remotely) and the timings."""
    manifest = json.loads((folder / "merge.json").read_text())
    for entry in manifest["inputs"]:
        entry.pop("path"), entry.pop("content_hash")
    manifest["recipe"].pop("inputs"), manifest["recipe"].pop("output")
    manifest["stats"] = {k: v for k, v in manifest["stats"].items() if not k.endswith("_seconds")}
    return manifest


@pytest.mark.parametrize("kind", ["hf-bin", "pt"])
def test_inspect_of_torch_pickles_in_a_bucket_lists_the_local_table(tmp_path, s3, capsys, kind):
    run, _ = _hf_bin_run(tmp_path) if kind == "hf-bin" else _pt_run(tmp_path)
    upload(s3, run, f"runs/inspect-{kind}")
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    assert main(["inspect", f"s3://runs/inspect-{kind}"]) == 0
    remote = capsys.readouterr().out
    assert local.splitlines() == remote.splitlines()
    assert "4 checkpoints" in remote


@pytest.mark.parametrize("kind, out_kind", [("hf-bin", "local"), ("hf-bin", "s3"), ("pt", "local")])
def test_merge_of_torch_pickles_from_s3_equals_the_local_merge(tmp_path, s3, capsys, kind, out_kind):
    run, states = _hf_bin_run(tmp_path) if kind == "hf-bin" else _pt_run(tmp_path)
    upload(s3, run, f"runs/merge-{kind}")
    assert main(["merge", str(run), "--last", "3", "-o", str(tmp_path / "local-out"), "--quiet",
                 "--chunk-size", "64"]) == 0
    out = str(tmp_path / "remote-out") if out_kind == "local" else f"s3://runs/merged-{kind}"
    assert main(["merge", f"s3://runs/merge-{kind}", "--last", "3", "-o", out, "--quiet", "--chunk-size", "64"]) == 0
    remote_dir = tmp_path / "remote-out" if out_kind == "local" else _fetch(s3, out[5:], tmp_path / "remote-out")
    local, remote = _tensors(tmp_path / "local-out"), _tensors(remote_dir)
    assert local.keys() == remote.keys() == set(states[0])  # prefixes stripped as locally
    for name in local:
        assert local[name].dtype == remote[name].dtype and torch.equal(local[name], remote[name]), name
    tolerance = 1e-2 if kind == "hf-bin" else 1e-6  # bf16 / fp32 storage of the merge
    for name, value in reference_merge(states[1:], [1 / 3] * 3).items():
        np.testing.assert_allclose(to_f64(remote[name]), value, rtol=tolerance, atol=tolerance)
    manifest = json.loads((remote_dir / "merge.json").read_text())
    names = [f"checkpoint-{s}" for s in (200, 300, 400)] if kind == "hf-bin" else \
        [f"step-{s:06d}.pt" for s in (200, 300, 400)]
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://runs/merge-{kind}/{n}" for n in names]
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])
    assert _manifest_without_locations(remote_dir) == _manifest_without_locations(tmp_path / "local-out")
    assert SECRET not in (remote_dir / "merge.json").read_text() + capsys.readouterr().out


def _requested_bytes(proxy, url_path: str) -> list[tuple[int, int]]:
    """The byte ranges the library asked of ``bucket/key`` through the proxy, as [start, stop)."""
    ranges = []
    for method, path, header in proxy.requests:
        if method == "GET" and path.split("?")[0] == f"/{url_path}":
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
            assert match, f"a GET of {path} without a range: {header!r}"
            ranges.append((int(match[1]), int(match[2]) + 1))
    return ranges


def test_every_input_byte_is_requested_about_once(tmp_path, s3, proxy):
    """fp32 states of ~600 kB per file, in pytorch_model.bin folders: the bytes requested of each object cover the
    tensors it holds, and add up to about its size (the zip directory's tail is read once more)."""
    big = [{**make_state(seed), "lm_head.weight": torch.randn(512, 256, generator=torch.Generator().manual_seed(seed))}
           for seed in range(3)]
    run = tmp_path / "bytesrun"
    for i, state in enumerate(big):
        write_checkpoint(run / f"checkpoint-{100 * (i + 1)}", state, "hf-bin")
    upload(s3, run, "runs/bytes-bin")
    proxy.requests.clear()
    assert main(["merge", "s3://runs/bytes-bin", "--last", "3", "-o", str(tmp_path / "out"), "--quiet",
                 "--chunk-size", "64"]) == 0
    assert not [r for r in proxy.requests if r[0] == "HEAD"]  # the listing's sizes and ETags are used
    for i in range(3):
        key = f"runs/bytes-bin/checkpoint-{100 * (i + 1)}/pytorch_model.bin"
        size = s3.size(key)
        ranges = _requested_bytes(proxy, key)
        asked = sum(b - a for a, b in ranges)
        assert size <= asked <= size + 8192, (key, asked, size, ranges)  # every byte once, plus the zip directory
        covered = np.zeros(size, dtype=np.int32)
        for a, b in ranges:
            covered[a:b] += 1
        assert covered.min() >= 1 and (covered > 1).sum() <= 8192


def _evil_pickle_file(path: Path) -> Path:
    """A torch zip file whose data.pkl calls os.system on loading (the marker file appears if it ever runs)."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {path.parent / 'PWNED'}",)

    torch.save({"model": make_state(0), "hook": Evil()}, path)
    return path


@pytest.mark.parametrize("kind", ["hf-bin", "pt"])
def test_a_pickle_with_a_forbidden_global_is_refused_in_one_line(tmp_path, s3, capsys, kind):
    run, _ = _pt_run(tmp_path, [make_state(s) for s in range(2)]) if kind == "pt" else _hf_bin_run(tmp_path)
    if kind == "pt":
        _evil_pickle_file(run / "step-000200.pt")
    else:
        _evil_pickle_file(run / "checkpoint-400" / "pytorch_model.bin")
    upload(s3, run, f"runs/evil-{kind}")
    for out in (str(tmp_path / "out"), f"s3://runs/evil-out-{kind}"):
        assert main(["merge", f"s3://runs/evil-{kind}", "--last", "2", "-o", out, "--quiet"]) == 2
        line = _error_line(capsys)
        assert "refusing to load" in line and "system is not allowed" in line and "Nothing from it" in line, line
    assert not (tmp_path / "out").exists() and not s3.find(f"runs/evil-out-{kind}")
    assert not (run / "PWNED").exists() and not list(tmp_path.rglob("PWNED"))


def test_a_legacy_torch_file_is_refused_without_downloading_it(tmp_path, s3, proxy, capsys):
    run, _ = _pt_run(tmp_path, [make_state(s) for s in range(2)])
    legacy = {"model": {**make_state(1), "big": torch.zeros(400_000)}}  # 1.6 MB: more than one read-ahead block
    torch.save(legacy, run / "step-000200.pt", _use_new_zipfile_serialization=False)
    upload(s3, run, "runs/legacy")
    proxy.requests.clear()
    assert main(["merge", "s3://runs/legacy", "--last", "2", "-o", str(tmp_path / "out"), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "s3://runs/legacy/step-000200.pt" in line and "legacy" in line and "torch.save" in line, line
    asked = sum(b - a for a, b in _requested_bytes(proxy, "runs/legacy/step-000200.pt"))
    assert asked < s3.size("runs/legacy/step-000200.pt") // 4
    assert not (tmp_path / "out").exists()


def test_an_object_replaced_during_the_merge_fails_and_publishes_nothing(tmp_path, s3, monkeypatch, capsys):
    from ckptmerge.io.remote_torch import RemoteTorchReader

    run, _ = _hf_bin_run(tmp_path)
    upload(s3, run, "runs/changed-bin")
    torch.save(make_state(99, dtype=torch.bfloat16), tmp_path / "other.bin")
    replace_on_first_read(monkeypatch, RemoteTorchReader, s3, tmp_path / "other.bin",
                          "runs/changed-bin/checkpoint-400/pytorch_model.bin")
    assert main(["merge", "s3://runs/changed-bin", "--last", "3", "-o", str(tmp_path / "out"), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "checkpoint-400" in line and "changed while it was being merged" in line, line
    assert not (tmp_path / "out").exists()


def test_the_reader_equals_the_local_reader_on_views_ties_and_dtypes(tmp_path, s3):
    """Names, aliases, dtypes, shapes, whole tensors and row ranges of an awkward state dict: tied names, a
    transposed and a sliced view, a Parameter, bool / int / bf16 / 0-d tensors, DDP prefixes."""
    from ckptmerge.io.remote import Url
    from ckptmerge.io.remote_tree import RemoteTree
    from ckptmerge.io.remote_torch import open_remote_torch
    from ckptmerge.io.torch_reader import TorchFileReader

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 16, generator=g)
    state = {"module.embed.weight": emb, "module.lm_head.weight": emb, "module.proj.weight": torch.randn(16, 24, generator=g).t(),
             "module.rows": emb[8:12], "module.param": torch.nn.Parameter(torch.randn(5, generator=g)),
             "module.mask": torch.tensor([True, False, True]), "module.ids": torch.arange(7),
             "module.half": torch.randn(3, 4, generator=g).bfloat16(), "module.scale": torch.tensor(2.5),
             "module.empty": torch.zeros(0, 4)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "odd.pt")
    s3.mkdir("runs") if not s3.exists("runs") else None
    s3.put_file(str(tmp_path / "odd.pt"), "runs/odd/odd.pt")
    tree = RemoteTree.list(Url("s3", "runs/odd/odd.pt"))
    local = TorchFileReader([tmp_path / "odd.pt"])
    with open_remote_torch(tree, [tree.object("")], display=Url("s3", "runs/odd/odd.pt")) as remote:
        assert remote.keys() == local.keys() and remote.aliases() == local.aliases() == {"lm_head.weight": "embed.weight"}
        for name in local.keys():
            assert remote.info(name) == local.info(name), name
            assert torch.equal(remote.get(name), local.get(name)), name
            rows = local.info(name).shape[0] if local.info(name).shape else 1
            for start, stop in ((0, rows), (1, 3), (rows // 2, rows)):
                assert torch.equal(remote.get_rows(name, start, stop), local.get_rows(name, start, stop)), name


def test_open_remote_torch_takes_a_sub_dict_and_strips_the_attribute(tmp_path, s3):
    """The trainer layouts' call: weights under ``state_dict`` with the module attribute ``model.`` removed, as
    ``layouts.base.weights_reader`` names them locally; the payload's step counter read by one range."""
    from ckptmerge.io.layouts.base import weights_reader
    from ckptmerge.io.remote import Url
    from ckptmerge.io.remote_tree import RemoteTree
    from ckptmerge.io.remote_torch import load_remote_torch_payload, open_remote_torch

    state = make_state(4)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": torch.tensor(70),
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(40, 8)}}}]}, tmp_path / "x.ckpt")
    s3.mkdir("runs") if not s3.exists("runs") else None
    s3.put_file(str(tmp_path / "x.ckpt"), "runs/sub/x.ckpt")
    tree = RemoteTree.list(Url("s3", "runs/sub/x.ckpt"))
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)
    local = weights_reader(tmp_path / "x.ckpt", loaded["state_dict"], "lightning", strip_attribute=True)
    with open_remote_torch(tree, [tree.object("")], Url("s3", "runs/sub/x.ckpt"), weights_of=lambda s: s["state_dict"],
                           framework="lightning", strip_attribute=True) as remote:
        assert remote.keys() == local.keys() and remote.metadata() == local.metadata()
        assert all(torch.equal(remote.get(k), local.get(k)) for k in local.keys())
    payload = load_remote_torch_payload(tree.fs, tree.object(""))
    assert payload.obj["global_step"].device.type == "meta" and int(payload.read(payload.obj["global_step"])) == 70
    payload.file.close()


def test_eval_of_an_s3_pytorch_model_bin_equals_the_local_eval(tmp_path, s3, monkeypatch):
    from bpe_model import sentences, train_run

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "evalrun"
    train_run(run, steps=(2,))
    folder = run / "checkpoint-2"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (run / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(7, 40)))
    upload(s3, run, "runs/eval-bin")
    results = {}
    for where, model, data in (("local", folder, run / "held.jsonl"),
                               ("s3", "s3://runs/eval-bin/checkpoint-2", "s3://runs/eval-bin/held.jsonl")):
        out = tmp_path / f"{where}.json"
        assert main(["eval", str(model), "--data", str(data), "--tokens", "300", "--quiet", "--json", str(out)]) == 0
        (by_data,) = json.loads(out.read_text()).values()
        (results[where],) = by_data.values()
        results[where].pop("data")
    assert results["s3"] == results["local"] and results["s3"]["tokens"] > 0


def test_a_payloads_small_tensors_are_read_alone_when_asked(tmp_path, s3, proxy):
    """``remote_payload_object`` (what the trainer layouts' ``detect`` / ``read_step`` see): meta tensors, the zip
    directory and data.pkl only; a step kept as a tensor is read by one range request of a few KiB when
    ``layouts.base.as_int`` asks for it, a weight has no such read. bf16 weights opened with ``half_to_fp32`` equal the
    local ``half_to_fp32_copies`` (exactly, tied names kept tied)."""
    from ckptmerge.io.layouts.base import as_int, half_to_fp32_copies, weights_reader
    from ckptmerge.io.remote import Url
    from ckptmerge.io.remote_tree import RemoteTree
    from ckptmerge.io.remote_torch import open_remote_torch, remote_payload_object

    big = torch.randn(512, 512, generator=torch.Generator().manual_seed(3))  # 1 MiB in front of the counter
    module = {"embed.weight": big.bfloat16(), "bias": torch.randn(7).bfloat16()}
    module["head.weight"] = module["embed.weight"]  # tied
    torch.save({"module": module, "global_steps": torch.tensor(1234)}, tmp_path / "states.pt")
    s3.mkdir("runs") if not s3.exists("runs") else None
    s3.put_file(str(tmp_path / "states.pt"), "runs/small/states.pt")
    tree = RemoteTree.list(Url("s3", "runs/small"))
    obj = tree.object("states.pt")
    proxy.requests.clear()
    payload = remote_payload_object(tree.fs, obj)
    directory_bytes = sum(_range_size(h) for m, p, h in proxy.requests if m == "GET" and h)
    assert directory_bytes < 16 * 1024 < obj.size, directory_bytes  # not the 1 MiB of weights
    assert payload["global_steps"].device.type == "meta" and not hasattr(payload["module"]["embed.weight"], "stored_value")
    proxy.requests.clear()
    assert as_int(payload["global_steps"]) == 1234
    ranged = [h for m, p, h in proxy.requests if m == "GET" and h]
    assert len(ranged) == 1 and _range_size(ranged[0]) <= 8192 and not [r for r in proxy.requests if r[0] == "HEAD"]
    proxy.requests.clear()
    assert as_int(payload["global_steps"]) == 1234 and not proxy.requests  # read once

    local = weights_reader(tmp_path, half_to_fp32_copies(torch.load(tmp_path / "states.pt")["module"]), "deepspeed")
    with open_remote_torch(tree, [obj], Url("s3", "runs/small"), weights_of=lambda s: s["module"],
                           framework="deepspeed", half_to_fp32=True) as remote:
        assert remote.keys() == local.keys() and remote.aliases() == local.aliases() == {"head.weight": "embed.weight"}
        assert remote.metadata() == local.metadata()
        for name in local.keys():
            assert remote.info(name) == local.info(name) and remote.info(name).dtype == torch.float32
            assert torch.equal(remote.get(name), local.get(name)) and torch.equal(remote.get_rows(name, 2, 5),
                                                                                  local.get_rows(name, 2, 5))


def _range_size(header: str) -> int:
    start, stop = re.fullmatch(r"bytes=(\d+)-(\d+)", header).groups()
    return int(stop) - int(start) + 1
