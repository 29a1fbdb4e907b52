"""Trainers' run folders at a URL (``io/remote_path.py``, ``io/remote_layout.py``): the layouts of ``io/layouts/``
run unchanged on a view of one listing. Each run is built here in its trainer's on-disk format (tiny models),
uploaded to the moto S3 server (``tests/s3_server.py``), and checked against the local copy of the same files:
``inspect`` prints the same table (steps from the same metadata files, the same framework names), ``merge`` gives
the same tensors bit for bit and the fp64 NumPy mean, discovery costs one LIST and one GET per small metadata file,
and weights are read by range requests only. DeepSpeed's fp32 masters (ZeRO 3, ``--fp32-masters``) and accelerate's
``checkpoint_K`` folders are checked in tests/test_remote_zero3.py."""

from __future__ import annotations

import json
import re
import urllib.parse
import zipfile

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ckptmerge.cli.main import main
from s3_server import SECRET, proxy, s3, s3_server, upload  # noqa: F401 - fixtures
from trainer_checks import fp64_mean, merged_tensors

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEPS = (10, 20, 30)


def _states() -> list[dict[str, torch.Tensor]]:
    """Three snapshots of a tiny MLP (212 parameters) as training would leave them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    out = []
    for _ in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _opt_state(state: dict) -> dict:
    return {"state": {i: {"step": torch.tensor(float(i + 1)), "exp_avg": torch.zeros_like(v)}
                      for i, v in enumerate(state.values())}, "param_groups": [{"lr": 0.05, "params": list(range(len(state)))}]}


# --- runs in each trainer's on-disk format; returns (run folder, the states a merge of the last two should mean,
#     the framework inspect must show) ---------------------------------------------------------------------------

def _hf_trainer(run, states):
    for step, state in zip(STEPS, states):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": 48 * step, "log_history": [{"learning_rate": 1e-3 / step}]}))
        torch.save(_opt_state(state), folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        (folder / "config.json").write_text('{"model_type": "tiny"}')
    save_file(states[-1], run / "model.safetensors")  # trainer.save_model(): the final model at the root
    (run / "config.json").write_text('{"model_type": "tiny"}')
    return "hf-trainer"


def _hf_trainer_bin(run, states):
    for step, state in zip(STEPS, states):  # save_safetensors=False: pytorch_model.bin, read by io/remote_torch.py
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        torch.save(_opt_state(state), folder / "optimizer.pt")
    return "hf-trainer"


def _hf_fsdp(run, states):
    for step, state in zip(STEPS, states):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(folder / "pytorch_model_fsdp_0"))
        dcp.save({"optimizer": {"lr": torch.tensor(0.05)}}, storage_writer=dcp.FileSystemWriter(folder / "optimizer_0"))
    return "hf-trainer"


def _accelerate(run, states):
    for step, state in zip(STEPS, states):
        folder = run / f"step_{step}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors")
        torch.save(_opt_state(state), folder / "optimizer.bin")
        torch.save({"random_state": 1}, folder / "random_states_0.pkl")
    return "accelerate"


def _torchtitan(run, states):
    for step, state in zip(STEPS, states):
        dcp.save({**state, "optimizer": {"lr": torch.tensor(0.05)}, "train_state": {"step": torch.tensor(step)}},
                 checkpoint_id=run / "checkpoint" / f"step-{step}")
    return "torchtitan/dcp"


def _olmo_core(run, states):
    from test_trainer_file_formats import _olmo_metadata

    for step, state in zip(STEPS, states):
        folder = run / f"step{step}"
        dcp.save({"model": state, "optim": {"lr": torch.tensor(0.05)}}, checkpoint_id=folder / "model_and_optim")
        _olmo_metadata(folder / "model_and_optim")
        (folder / "train").mkdir()
        torch.save({"global_step": step, "global_train_tokens_seen": 48 * step, "max_steps": 40}, folder / "train" / "rank0.pt")
    return "olmo-core"


def _megatron(run, states):
    import argparse
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

    for step, state in zip(STEPS, states):
        folder = run / f"iter_{step:07d}"
        extra = {"decoder.layers.mlp._extra_state/shard_0_1": io.BytesIO(b"te-state")}
        dcp.save({**state, **extra}, checkpoint_id=folder)
        meta = pickle.loads((folder / ".metadata").read_bytes())
        meta.planner_data = {"plan": SavePlan([WriteItem(MetadataIndex("x"), WriteItemType.BYTE_IO)])}
        (folder / ".metadata").write_bytes(pickle.dumps(meta))
        torch.save({"iteration": step, "args": argparse.Namespace(consumed_train_samples=4 * step, seq_length=16)},
                   folder / "common.pt")
        (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
        (run / "latest_checkpointed_iteration.txt").write_text(str(step))
    return "megatron"


def _lightning_sharded(run, states):
    for step, state in zip(STEPS, states):  # ModelParallelStrategy: state_dict.<attribute>.<name> + optimizer_0
        folder = run / f"epoch=0-step={step}.ckpt"
        dcp.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "optimizer_0": {"lr": torch.tensor(0.05)}},
                 checkpoint_id=folder)
        torch.save({"global_step": step, "epoch": 0, "pytorch-lightning_version": "2.5.0"}, folder / "meta.pt")
    return "lightning"


def _deepspeed(run, states, dtype=torch.float32):
    """ZeRO 0/1/2 on one rank (``engine.save_checkpoint``): the weights are ``module`` in the training dtype; the
    ZeRO optimizer file beside it is never read."""
    for step, state in zip(STEPS, states):
        tag = run / f"global_step{step}"
        tag.mkdir()
        module = {f"module.{k}": v.to(dtype) for k, v in state.items()}  # DDP's prefix, stripped as locally
        torch.save({"module": module, "global_steps": step, "global_samples": 4 * step, "buffer_names": [],
                    "optimizer": None, "lr_scheduler": None, "ds_config": {"train_batch_size": 4},
                    "ds_version": "0.16.4"}, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": _opt_state(state), "ds_version": "0.16.4"},
                   tag / f"{'bf16_' if dtype == torch.bfloat16 else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (run / "latest").write_text(f"global_step{STEPS[-1]}")
    (run / "zero_to_fp32.py").write_text("# DeepSpeed's conversion script\n")
    return "deepspeed"


def _deepspeed_bf16(run, states):
    return _deepspeed(run, states, torch.bfloat16)


def _litgpt(run, states):
    """``fabric.save`` of ``{"model", "optimizer", "iter_num", "step_count"}`` (tests/test_trainer_file_formats.py)."""
    for step, state in zip(STEPS, states):
        folder = run / f"step-{step:08d}"
        folder.mkdir()
        torch.save({"model": state, "optimizer": _opt_state(state), "train_dataloader": {"epoch": 0},
                    "iter_num": 2 * step, "step_count": step}, folder / "lit_model.pth")
        (folder / "model_config.yaml").write_text("name: tiny\n")
    return "litgpt"


def _nanogpt(run, states):
    """nanoGPT's ``ckpt.pt`` of a compiled model (``_orig_mod.`` stripped); ``iter_num`` kept as a tensor here: the
    step is one small range read of the weights file (the name's fallback, 0 / 1 / 2, would be wrong)."""
    for i, (step, state) in enumerate(zip(STEPS, states)):
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "optimizer": _opt_state(state),
                    "model_args": {"n_layer": 1}, "iter_num": torch.tensor(step), "best_val_loss": torch.tensor(2.0),
                    "config": {"batch_size": 4}}, run / f"ckpt_{i}.pt")
    return "nanogpt"


def _composer(run, states):
    """Composer's ``{"state": {"model", "optimizers", "timestamp", ...}, "rng"}`` with numpy RNG state,
    ``TorchVersion`` and ``timedelta`` (tests/test_trainer_file_formats.py), and ``latest-rank0.pt``."""
    import datetime

    from torch.torch_version import TorchVersion

    for step, state in zip(STEPS, states):
        stamp = {"iteration": 0, "epoch": 0, "batch": step, "sample": 4 * step, "token": 48 * step,
                 "batch_in_epoch": step, "total_wct": datetime.timedelta(seconds=step), "epoch_wct": datetime.timedelta(0)}
        body = {"model": {f"model.{k}": v for k, v in state.items()}, "optimizers": {"AdamW": _opt_state(state)},
                "schedulers": [], "algorithms": [], "callbacks": {}, "scaler": None, "timestamp": stamp,
                "rank_zero_seed": 17, "run_name": "tiny", "integrations": {"composer_version": TorchVersion("0.32.1")}}
        torch.save({"state": body, "rng": [{"python": None, "numpy": np.random.get_state(),
                                             "torch": torch.random.get_rng_state()}]}, run / f"ep0-ba{step}-rank0.pt")
    (run / "latest-rank0.pt").write_bytes((run / f"ep0-ba{STEPS[-1]}-rank0.pt").read_bytes())  # a copy at a URL
    return "composer"


def _lightning_files(run, states):
    for step, state in zip(STEPS, states):
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": step, "epoch": 0,
                    "pytorch-lightning_version": "2.5.0", "optimizer_states": [_opt_state(state)],
                    "lr_schedulers": []}, run / f"epoch=0-step={step}.ckpt")
    (run / "last.ckpt").write_bytes((run / f"epoch=0-step={STEPS[-1]}.ckpt").read_bytes())  # save_last
    return "lightning"


READABLE = {"hf-trainer": _hf_trainer, "hf-trainer-bin": _hf_trainer_bin, "hf-fsdp-sharded": _hf_fsdp, "accelerate": _accelerate,
            "torchtitan": _torchtitan, "olmo-core": _olmo_core, "megatron": _megatron,
            "lightning-sharded": _lightning_sharded, "deepspeed": _deepspeed, "deepspeed-bf16": _deepspeed_bf16,
            "litgpt": _litgpt, "nanogpt": _nanogpt, "composer": _composer, "lightning-files": _lightning_files}
# layouts whose weights are one torch pickle per checkpoint: discovery reads its zip directory and data.pkl by range
PICKLE_KINDS = {"deepspeed": "mp_rank_00_model_states.pt", "deepspeed-bf16": "mp_rank_00_model_states.pt",
                "litgpt": "lit_model.pth", "nanogpt": ".pt", "composer": ".pt", "lightning-files": ".ckpt"}
FILE_KINDS = ("nanogpt", "composer", "lightning-files")  # each checkpoint is one object, not a folder
SMALL_FILES = ("trainer_state.json", "common.pt", "train/rank0.pt", "meta.pt", ".metadata")
WEIGHTS = (".safetensors", ".distcp", "pytorch_model.bin", "model_states.pt", "lit_model.pth", ".ckpt")
STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "optim_states.pt")


def _is_weights(key: str, kind: str) -> bool:
    return key.endswith(WEIGHTS) or (kind in PICKLE_KINDS and key.endswith(PICKLE_KINDS[kind])
                                     and not key.endswith(SMALL_FILES))


def _listing_and_gets(requests):
    """(LIST requests, whole-object GETs as key names, ranged GETs as key names, HEADs) among proxy requests."""
    lists, whole, ranged, heads = 0, [], [], 0
    for method, path, rng in requests:
        parsed = urllib.parse.urlparse(path)
        if method == "HEAD":
            heads += 1
        elif method == "GET" and "list-type" in parsed.query:
            lists += 1
        elif method == "GET":
            (ranged if rng else whole).append(urllib.parse.unquote(parsed.path))
    return lists, whole, ranged, heads


@pytest.mark.parametrize("kind", list(READABLE))
def test_a_trainer_run_at_a_url_inspects_and_merges_like_the_local_copy(tmp_path, s3, proxy, capsys, kind):
    from ckptmerge.merging.remote_discover import discover_remote

    run = tmp_path / "run"
    run.mkdir()
    states = _states()
    framework = READABLE[kind](run, states)
    top = run / "checkpoint" if kind == "torchtitan" else run
    prefix = f"runs/{kind}"
    upload(s3, top, prefix)
    url = f"s3://{prefix}"

    # discovery: one LIST of the run, one GET per small metadata file; a weights pickle's zip directory and
    # data.pkl (and a step kept as a tensor) by range requests, never the whole object; nothing else
    proxy.requests.clear()
    found = discover_remote(url)
    lists, whole, ranged, heads = _listing_and_gets(proxy.requests)
    assert [r.step for r in found.checkpoints] == list(STEPS)
    assert {r.framework for r in found.checkpoints} == {framework}
    assert lists == 1 and heads == 0, proxy.requests
    assert all(_is_weights(key, kind) for key in ranged) and (bool(ranged) == (kind in PICKLE_KINDS)), ranged
    assert all(key.endswith(SMALL_FILES) for key in whole), whole
    assert len(whole) == len(set(whole)) <= len(STEPS)  # one GET per metadata file, at most one per checkpoint

    assert main(["inspect", str(top)]) == 0
    local = capsys.readouterr().out
    proxy.requests.clear()
    assert main(["inspect", url]) == 0
    remote = capsys.readouterr().out
    assert remote.splitlines() == local.splitlines()  # names, steps, tokens, lr, framework, format, dtype, size, skips
    assert [line.split()[1] for line in remote.splitlines()[2:2 + len(STEPS)]] == [str(s) for s in STEPS], remote
    assert all(framework in line.split() for line in remote.splitlines()[2:2 + len(STEPS)]), remote
    lists, whole, ranged, heads = _listing_and_gets(proxy.requests)
    # the run, then each checkpoint's size and dtypes; a checkpoint that is one object (nanoGPT, Composer, Lightning
    # files) is listed as a key, which s3fs answers with a HEAD, and its file opened with one more
    assert lists <= 1 + 2 * len(STEPS), proxy.requests
    assert heads <= (3 * len(STEPS) if kind in FILE_KINDS else 0), proxy.requests
    assert not any(_is_weights(key, kind) for key in whole), whole  # weights: ranges only
    assert not any(key.endswith(STATE_FILES) for key in whole + ranged)

    assert main(["merge", str(top), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    proxy.requests.clear()
    assert main(["merge", url, "--last", "2", "-o", str(tmp_path / "remote-out"), "--quiet"]) == 0
    _, whole, ranged, _ = _listing_and_gets(proxy.requests)
    assert not any(_is_weights(key, kind) for key in whole), whole  # no weight object fetched whole
    if kind not in PICKLE_KINDS and kind != "hf-trainer-bin":  # a 5 KB pickle came with inspect's directory read
        assert any(_is_weights(key, kind) for key in ranged)
    assert not any(key.endswith(STATE_FILES) for key in whole + ranged)  # optimizer / scheduler state never read
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert sorted(remote_t) == sorted(states[0]) and local_t.keys() == remote_t.keys()  # the model's own names
    for name in local_t:
        assert local_t[name].dtype == remote_t[name].dtype and torch.equal(local_t[name], remote_t[name]), name
    if kind == "deepspeed-bf16":  # bf16 module weights, read as fp32 (exactly): the mean of the rounded values
        states = [{k: v.bfloat16().float() for k, v in state.items()} for state in states]
        assert all(t.dtype == torch.float32 for t in remote_t.values())
    for name, want in fp64_mean(states[1:]).items():  # independent fp64 NumPy mean of the last two
        np.testing.assert_allclose(remote_t[name].to(torch.float64).numpy(), want, rtol=0, atol=1e-6, err_msg=name)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(r.path) for r in found.checkpoints[1:]]
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])
    assert SECRET not in capsys.readouterr().out


def _big_states() -> list[dict[str, torch.Tensor]]:
    """Three snapshots of a 0.5M-parameter MLP (2 MB of fp32 weights per checkpoint)."""
    g = torch.Generator().manual_seed(1)
    shapes = {"0.weight": (512, 512), "0.bias": (512,), "2.weight": (512, 512), "2.bias": (512,)}
    return [{k: torch.randn(*shape, generator=g) for k, shape in shapes.items()} for _ in STEPS]


@pytest.mark.parametrize("kind", list(PICKLE_KINDS))
def test_a_pickle_layout_reads_each_weight_byte_about_once(tmp_path, s3, proxy, kind):
    """``merge --last 2`` of 2 MB checkpoints: no weights object is fetched whole; the bytes asked of each merged
    object cover every byte of its model tensors and add up to at most 1.01x the object (the zip directory and
    data.pkl are read once, by discovery, with a 4 KiB read-ahead); the checkpoint not merged costs only its
    directory and data.pkl; the result equals the local merge bit for bit."""
    from ckptmerge.io.torch_file_rewrite import load_tensor_refs

    run = tmp_path / "run"
    run.mkdir()
    states = _big_states()
    READABLE[kind](run, [{k: v.clone() for k, v in s.items()} for s in states])
    upload(s3, run, f"runs/bytes-{kind}")
    proxy.requests.clear()
    assert main(["merge", f"s3://runs/bytes-{kind}", "--last", "2", "-o", str(tmp_path / "remote-out"), "--quiet"]) == 0
    _, whole, _, _ = _listing_and_gets(proxy.requests)
    assert not any(_is_weights(key, kind) for key in whole), whole
    files = sorted(p for p in run.rglob("*") if p.is_file() and _is_weights(p.as_posix(), kind)
                   and p.name not in ("latest-rank0.pt", "last.ckpt"))
    assert len(files) == len(STEPS), files
    for i, file in enumerate(files):
        key = f"runs/bytes-{kind}/{file.relative_to(run).as_posix()}"
        size = s3.size(key)
        ranges = _requested_ranges(proxy, key)
        asked = sum(b - a for a, b in ranges)
        if i == 0:  # not merged: its directory and data.pkl only
            assert asked <= 64 * 1024, (key, asked, size)
            continue
        assert asked <= 1.01 * size, (key, asked, size, ranges)
        covered = np.zeros(size, dtype=bool)
        for a, b in ranges:
            covered[a:b] = True
        weights = [ref for name, ref in _model_refs(load_tensor_refs(file), kind).items()]
        with zipfile.ZipFile(file) as archive:
            for ref in weights:  # every byte of every model tensor was requested
                info = archive.getinfo(next(n for n in archive.namelist() if n.endswith(f"/data/{ref.key}")))
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                assert covered[start:start + info.file_size].all(), (key, ref.key)
    assert main(["merge", str(run), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert local_t.keys() == remote_t.keys() and all(torch.equal(local_t[k], remote_t[k]) for k in local_t)


def _model_refs(obj: dict, kind: str) -> dict:
    """The model's tensor refs inside each layout's payload."""
    if kind.startswith("deepspeed"):
        return obj["module"]
    if kind == "composer":
        return obj["state"]["model"]
    return obj["state_dict"] if kind == "lightning-files" else obj["model"]


def _requested_ranges(proxy, url_path: str) -> list[tuple[int, int]]:
    """The byte ranges asked of ``bucket/key`` through the proxy, as [start, stop)."""
    ranges = []
    for method, path, header in proxy.requests:
        if method == "GET" and urllib.parse.unquote(path.split("?")[0]) == f"/{url_path}":
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
            assert match, f"a GET of {path} without a range: {header!r}"
            ranges.append((int(match[1]), int(match[2]) + 1))
    return ranges


# --- runs written by DeepSpeed itself; refusals that stay the same at a URL ---------------------------------------

def _deepspeed_script(run, stage: int, dtype: str, port: int, world: int = 1) -> None:
    """A run written by DeepSpeed's own ``engine.save_checkpoint`` (tests/trainer_scripts/deepspeed_run.py, CPU, gloo
    ranks; steps 2, 4, 6, 8): its ``checkpoints/`` folder in ``run``, DeepSpeed's reference mean in ``run.parent``."""
    import shutil

    pytest.importorskip("deepspeed", reason="deepspeed is a test extra")
    from test_trainer_deepspeed import run_script

    work = run.parent / f"ds-zero{stage}-{dtype}"
    work.mkdir()
    run_script("train", work, stage, dtype, port=port, world=world)
    shutil.copytree(work / "checkpoints", run, dirs_exist_ok=True)
    shutil.copyfile(work / "reference.pt", run.parent / "reference.pt")


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert SECRET not in err[0]
    return err[0]


def test_a_zero3_run_saved_by_deepspeed_at_a_url_merges_like_the_local_copy(tmp_path, s3, proxy, capsys):
    """ZeRO 3, bf16, 2 gloo ranks, written by ``engine.save_checkpoint``: the fp32 masters read by ranges of each
    rank's master records (io/remote_zero.py): the same table, the same merge bit for bit, equal in fp64 to the mean
    of DeepSpeed's own ``zero_to_fp32`` consolidations; no optimizer or model-states file fetched whole, no HEAD."""
    run = tmp_path / "run"
    run.mkdir()
    _deepspeed_script(run, 3, "bf16", port=29627, world=2)
    upload(s3, run, "runs/ds-zero3")
    capsys.readouterr()  # DeepSpeed's import-time warning
    whole, ranged, heads = _same_table_then_merge(run, "s3://runs/ds-zero3", tmp_path, proxy, capsys)
    assert heads == 0 and not any(key.endswith(".pt") for key in whole), whole
    assert any("optim_states" in key for key in ranged)
    _merges_equal_each_other_and_the_reference(tmp_path)


def test_a_layouts_own_refusal_is_the_same_at_a_url(tmp_path, s3, capsys):
    """A tensor-parallel DeepSpeed run (mp_rank_01 files) is refused by the layout's own rule at the URL as locally:
    the same line but for the location, exit 2, nothing written."""
    run = tmp_path / "run"
    run.mkdir()
    _deepspeed(run, _states())
    for step in STEPS:
        torch.save({"module": {}, "global_steps": step}, run / f"global_step{step}" / "mp_rank_01_model_states.pt")
    upload(s3, run, "runs/ds-tensor-parallel")
    lines = []
    for where in (str(run), "s3://runs/ds-tensor-parallel"):
        assert main(["merge", where, "--last", "2", "-o", str(tmp_path / "out")]) == 2
        lines.append(_error_line(capsys).replace(where, "RUN"))
    assert lines[0] == lines[1] and "tensor- or pipeline-parallel DeepSpeed" in lines[0], lines
    assert not (tmp_path / "out").exists()


def _merges_equal_each_other_and_the_reference(tmp_path) -> None:
    """remote-out equals local-out bit for bit (fp32) and DeepSpeed's own consolidation (reference.pt) in fp64."""
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert local_t.keys() == remote_t.keys() and all(
        remote_t[k].dtype == local_t[k].dtype == torch.float32 and torch.equal(local_t[k], remote_t[k]) for k in local_t)
    reference = torch.load(tmp_path / "reference.pt")
    assert sorted(reference) == sorted(remote_t)
    for name, want in reference.items():
        np.testing.assert_allclose(remote_t[name].to(torch.float64).numpy(), want.numpy(), rtol=0, atol=1e-5)


def _same_table_then_merge(run, url: str, tmp_path, proxy, capsys) -> tuple[list, list, int]:
    """``inspect`` of the URL prints the local table (steps 2, 4, 6, 8), then both copies are merged (``--last 3``
    into local-out and remote-out); returns the whole GETs, ranged GETs and HEADs of the URL's inspect and merge."""
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    proxy.requests.clear()
    assert main(["inspect", url]) == 0
    assert capsys.readouterr().out.splitlines() == local.splitlines()
    assert [line.split()[1] for line in local.splitlines()[2:6]] == ["2", "4", "6", "8"], local
    assert main(["merge", str(run), "--last", "3", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    assert main(["merge", url, "--last", "3", "-o", str(tmp_path / "remote-out"), "--quiet"]) == 0
    _, whole, ranged, heads = _listing_and_gets(proxy.requests)
    return whole, ranged, heads


def test_a_deepspeed_run_saved_by_deepspeed_at_a_url_merges_like_the_local_copy(tmp_path, s3, proxy, capsys):
    """ZeRO 2, bf16, written by ``engine.save_checkpoint``: the same table (steps from ``global_steps`` in the
    model-states pickle, read from its data.pkl by range), the same fp32 merge bit for bit, equal to DeepSpeed's own
    ``load_checkpoint`` mean in fp64; the ZeRO optimizer files are never requested."""
    run = tmp_path / "run"
    run.mkdir()
    _deepspeed_script(run, 2, "bf16", port=29629)
    upload(s3, run, "runs/ds-engine")
    whole, ranged, heads = _same_table_then_merge(run, "s3://runs/ds-engine", tmp_path, proxy, capsys)
    assert heads == 0 and not any(key.endswith("model_states.pt") for key in whole), whole
    assert not any("optim_states" in key for key in whole + ranged)
    _merges_equal_each_other_and_the_reference(tmp_path)


def test_named_trainer_checkpoints_at_urls_merge_like_the_local_ones(tmp_path, s3, capsys):
    """Checkpoints named one by one (no run discovery): each URL is listed alone, its layout and step told from it."""
    run = tmp_path / "run"
    run.mkdir()
    states = _states()
    _olmo_core(run, states)
    upload(s3, run, "runs/named-olmo")
    names = [f"step{s}" for s in STEPS[1:]][::-1]  # newest first: ordered by the steps read from train/rank0.pt
    assert main(["merge", *[str(run / n) for n in names], "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    assert main(["merge", *[f"s3://runs/named-olmo/{n}" for n in names], "-o", str(tmp_path / "remote-out"),
                 "--quiet"]) == 0
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert local_t.keys() == remote_t.keys() and all(torch.equal(local_t[k], remote_t[k]) for k in local_t)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [(i["path"], i["step"]) for i in manifest["inputs"]] == [(f"s3://runs/named-olmo/step{s}", s) for s in STEPS[1:]]


@pytest.mark.parametrize("kind", ["nanogpt", "lightning-files"])
def test_named_pickle_checkpoints_at_urls_merge_like_the_local_ones(tmp_path, s3, capsys, kind):
    """Single-file checkpoints named one by one: each URL is one object, its layout told from its data.pkl, its step
    read from it (nanoGPT's iter_num tensor: one small range read), ordered by step, merged as the local files."""
    run = tmp_path / "run"
    run.mkdir()
    READABLE[kind](run, _states())
    upload(s3, run, f"runs/named-{kind}")
    names = sorted(p.name for p in run.iterdir() if p.name != "last.ckpt")[1:][::-1]  # the newest two, newest first
    assert main(["merge", *[str(run / n) for n in names], "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    assert main(["merge", *[f"s3://runs/named-{kind}/{n}" for n in names], "-o", str(tmp_path / "remote-out"),
                 "--quiet"]) == 0
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert local_t.keys() == remote_t.keys() and all(torch.equal(local_t[k], remote_t[k]) for k in local_t)
    local_m = json.loads((tmp_path / "local-out" / "merge.json").read_text())
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [i["step"] for i in local_m["inputs"]] == list(STEPS[1:])
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://runs/named-{kind}/{n}" for n in names[::-1]]


def test_the_remote_list_of_state_pickles_is_discoverys():
    """io may not import merging, so remote_layout keeps its own copy of discovery's list of non-weight files."""
    from ckptmerge.io.remote_layout import STATE_PICKLES
    from ckptmerge.merging.discover import NOT_WEIGHTS

    assert STATE_PICKLES == NOT_WEIGHTS
