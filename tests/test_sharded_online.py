"""Averaging under FSDP2 and DDP with 2 gloo ranks, against a single-process run of the same trajectory.

The references are independent of the averagers: ``torch.optim.swa_utils.AveragedModel`` for the EMA, an
fp64 mean of the snapshots for LAWA, and ``torch.distributed.checkpoint.load`` / ``safetensors`` for reading
what was saved. Two spawns: a run killed at step 6 (checkpoint at step 4), then the uninterrupted run, the
run resumed from the killed run's checkpoint, and a DDP run.
"""

import socket

import pytest
import sharded_runs as runs
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ckptmerge.errors import ShardLayoutError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.online import EMA
from ckptmerge.online.state_files import load_state

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _spawn(mode: str, out) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(runs.worker, args=(runs.WORLD, port, str(out), mode), nprocs=runs.WORLD, join=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    _spawn("killed", folder)
    _spawn("full", folder)
    return folder


@pytest.fixture(scope="module")
def reference():
    """Single-process EMA (AveragedModel) and LAWA (fp64 mean of the last k snapshots) of the same run."""
    ema, snapshots = None, []
    for step, model in runs.single_process_run():
        if ema is None:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(runs.EMA_DECAY))
        ema.update_parameters(model)
        if step % runs.LAWA_EVERY == 0:
            snapshots.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    lawa = {k: sum(s[k] for s in snapshots[-runs.LAWA_K:]) / runs.LAWA_K for k in snapshots[-1]}
    return {"ema": {k: v.detach().double() for k, v in ema.module.named_parameters()}, "lawa": lawa,
            "scale": model.scale.clone(), "counter": model.counter.clone()}


def _assert_matches(saved: dict, want: dict, label: str) -> None:
    for name, value in want.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=0, atol=1e-6, msg=f"{label}: {name}")


@pytest.mark.parametrize("run", ["fsdp", "ddp"])
@pytest.mark.parametrize("kind", ["ema", "lawa"])
def test_dcp_save_loads_as_one_model_equal_to_the_single_process_average(out, reference, run, kind):
    model = runs.Net()  # a torchtitan-style load: the plain model's state dict, filled in place by DCP
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=out / f"{run}-{kind}-dcp")
    _assert_matches(state, reference[kind], f"{run} {kind} dcp")
    assert torch.equal(state["counter"], reference["counter"])  # non-float buffers: the newest, copied
    reader = open_checkpoint(out / f"{run}-{kind}-dcp")  # and ckptmerge's own DCP reader (merge/eval inputs)
    _assert_matches({k: reader.get(k) for k in reader.keys()}, reference[kind], f"{run} {kind} DcpReader")


@pytest.mark.parametrize("run", ["fsdp", "ddp"])
@pytest.mark.parametrize("kind", ["ema", "lawa"])
def test_hf_save_gathers_one_file_equal_to_the_single_process_average(out, reference, run, kind):
    saved = load_file(out / f"{run}-{kind}-hf" / "model.safetensors")
    assert "head.weight" not in saved  # the tied weight is written once
    _assert_matches(saved, reference[kind], f"{run} {kind} hf")
    assert not list(out.glob(f".{run}-{kind}-hf.tmp-*"))  # published atomically, nothing left behind


def test_ddp_ranks_hold_the_same_average(out):
    a, b = (torch.load(out / f"ddp-ema-rank{r}.pt", weights_only=True) for r in range(runs.WORLD))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["ema", "lawa"])
def test_killed_and_resumed_fsdp_run_ends_with_the_uninterrupted_average(out, kind):
    resumed = open_checkpoint(out / f"resumed-{kind}-dcp")
    uninterrupted = open_checkpoint(out / f"fsdp-{kind}-dcp")
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted.keys():
        torch.testing.assert_close(resumed.get(key), uninterrupted.get(key), rtol=0, atol=1e-6, msg=key)
    assert not (out / f"killed-{kind}-dcp").exists()  # the killed run never reached its save


def test_sharded_state_is_refused_by_another_world_size(out):
    folder = out / f"killed-step{runs.CHECKPOINT_STEP}"
    assert sorted(p.name for p in folder.glob("ema.*")) == ["ema.rank0-of-2.pt", "ema.rank1-of-2.pt"]
    with pytest.raises(ShardLayoutError, match="same world size|resume with the world size"):
        load_state(EMA(runs.EMA_DECAY), folder, stem="ema")  # this test process is one rank of one
    state = torch.load(folder / "ema.rank1-of-2.pt", weights_only=True)
    with pytest.raises(ShardLayoutError, match="rank 1 of 2"):
        EMA(runs.EMA_DECAY).load_state_dict(state)


def test_a_failure_on_one_rank_raises_on_every_rank_and_publishes_nothing(out):
    assert (out / "failed-save-rank1.txt").read_text() == "OSError: disk full (injected)"
    assert "rank 1: OSError: disk full (injected)" in (out / "failed-save-rank0.txt").read_text()
    assert not list(out.glob("*failed-save")) and not list(out.glob(".failed-save.tmp-*"))
