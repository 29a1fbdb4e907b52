"""Trainers' run folders at a URL (``io/remote_path.py``, ``io/remote_layout.py``): the layouts of ``io/layouts/``
run unchanged on a view of one listing. Each run is built here in its trainer's on-disk format (tiny models),
uploaded to the moto S3 server (``tests/s3_server.py``), and checked against the local copy of the same files:
``inspect`` prints the same table (steps from the same metadata files, the same framework names), ``merge`` gives
the same tensors bit for bit and the fp64 NumPy mean, discovery costs one LIST and one GET per small metadata file,
and weights are read by range requests only. Layouts whose weights are torch pickles are refused in one line."""

from __future__ import annotations

import json
import urllib.parse

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


READABLE = {"hf-trainer": _hf_trainer, "hf-trainer-bin": _hf_trainer_bin, "hf-fsdp-sharded": _hf_fsdp, "accelerate": _accelerate,
            "torchtitan": _torchtitan, "olmo-core": _olmo_core, "megatron": _megatron,
            "lightning-sharded": _lightning_sharded}
SMALL_FILES = ("trainer_state.json", "common.pt", "rank0.pt", "meta.pt", ".metadata")
WEIGHTS = (".safetensors", ".distcp", "pytorch_model.bin")


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

    # discovery: one LIST of the run, one GET per small metadata file, nothing else
    proxy.requests.clear()
    found = discover_remote(url)
    lists, whole, ranged, heads = _listing_and_gets(proxy.requests)
    assert [r.step for r in found.checkpoints] == list(STEPS)
    assert {r.framework for r in found.checkpoints} == {framework}
    assert lists == 1 and heads == 0 and not ranged, proxy.requests
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
    assert heads == 0 and lists <= 1 + 2 * len(STEPS), proxy.requests  # the run, then each checkpoint's size and dtypes
    assert not any(key.endswith(WEIGHTS) for key in whole), whole  # weights: ranges only

    assert main(["merge", str(top), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    proxy.requests.clear()
    assert main(["merge", url, "--last", "2", "-o", str(tmp_path / "remote-out"), "--quiet"]) == 0
    _, whole, ranged, _ = _listing_and_gets(proxy.requests)
    assert not any(key.endswith(WEIGHTS) for key in whole), whole  # no weight object fetched whole
    assert any(key.endswith(WEIGHTS) for key in ranged)
    assert not any(key.endswith(("optimizer.pt", "optimizer.bin", "scheduler.pt")) for key in whole + ranged)
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert sorted(remote_t) == sorted(states[0]) and local_t.keys() == remote_t.keys()  # the model's own names
    for name in local_t:
        assert local_t[name].dtype == remote_t[name].dtype and torch.equal(local_t[name], remote_t[name]), name
    for name, want in fp64_mean(states[1:]).items():  # independent fp64 NumPy mean of the last two
        np.testing.assert_allclose(remote_t[name].to(torch.float64).numpy(), want, rtol=0, atol=1e-6, err_msg=name)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(r.path) for r in found.checkpoints[1:]]
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])
    assert SECRET not in capsys.readouterr().out


# --- layouts whose weights are torch pickles: refused at a URL in one line, exit 2, nothing written -------------

def _deepspeed(run, states):
    for step, state in zip(STEPS, states):
        (run / f"global_step{step}").mkdir()
        torch.save({"module": state, "global_steps": step}, run / f"global_step{step}" / "mp_rank_00_model_states.pt")
    (run / "latest").write_text(f"global_step{STEPS[-1]}")
    return "deepspeed"


def _litgpt(run, states):
    for step, state in zip(STEPS, states):
        (run / f"step-{step:08d}").mkdir()
        torch.save({"model": state, "iter_num": 2 * step, "step_count": step}, run / f"step-{step:08d}" / "lit_model.pth")
    return "litgpt"


def _nanogpt(run, states):
    for i, (step, state) in enumerate(zip(STEPS, states)):
        torch.save({"model": state, "iter_num": step, "best_val_loss": torch.tensor(2.0)}, run / f"ckpt_{i}.pt")
    return "nanogpt"


def _lightning_files(run, states):
    for step, state in zip(STEPS, states):
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": step,
                    "pytorch-lightning_version": "2.5.0"}, run / f"epoch=0-step={step}.ckpt")
    return "lightning"


REFUSED = {"deepspeed": _deepspeed, "litgpt": _litgpt, "nanogpt": _nanogpt, "lightning-files": _lightning_files}


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert SECRET not in err[0]
    return err[0]


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_pickle_layout_at_a_url_is_refused_in_one_line(tmp_path, s3, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    framework = REFUSED[kind](run, _states())
    upload(s3, run, f"runs/refused-{kind}")
    assert main(["inspect", str(run)]) == 0  # the local copy is a readable run of this framework
    assert framework in capsys.readouterr().out
    for argv in (["inspect", f"s3://runs/refused-{kind}"],
                 ["merge", f"s3://runs/refused-{kind}", "--last", "2", "-o", str(tmp_path / "out")]):
        assert main(argv) == 2
        line = _error_line(capsys)
        assert f"s3://runs/refused-{kind}/" in line and framework in line and "local folder" in line, line
        assert "Traceback" not in line
    assert not (tmp_path / "out").exists()


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


def test_the_remote_list_of_state_pickles_is_discoverys():
    """io may not import merging, so remote_layout keeps its own copy of discovery's list of non-weight files."""
    from ckptmerge.io.remote_layout import STATE_PICKLES
    from ckptmerge.merging.discover import NOT_WEIGHTS

    assert STATE_PICKLES == NOT_WEIGHTS
