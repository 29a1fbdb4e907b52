"""Training runs for the distributed averaging tests: 2 gloo ranks, FSDP2 (``fully_shard``) and DDP.

Run by ``tests/test_sharded_online.py`` through ``torch.multiprocessing.spawn``, or by hand:
``torchrun --nproc-per-node 2 tests/sharded_runs.py OUT``. Every rank draws its own batch from a generator
seeded by (step, rank), so a single process that trains on both ranks' batches together follows the same
trajectory (gradients are averaged over ranks): that single-process run is the reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ckptmerge.online import EMA, LAWA
from ckptmerge.online.state_files import load_state, save_state

STEPS, CHECKPOINT_STEP, KILL_STEP = 8, 4, 6
EMA_DECAY, LAWA_K, LAWA_EVERY = 0.8, 3, 2
WORLD = 2
POWER_SIGMA_REL, PHEMA_SIGMA_RELS, PHEMA_EVERY = 0.15, (0.10, 0.20), 4


class Net(torch.nn.Module):
    """Small model with a tied weight, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("counter", torch.zeros(1, dtype=torch.int64))

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.embed(x)) * self.scale))


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, dims=1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        inner = getattr(model, "module", model)
        inner.scale.mul_(0.99)
        inner.counter += 1


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def single_process_run(steps: int = STEPS):
    """The reference: one process, both ranks' batches at once. Yields (step, model) after each step."""
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(model)
    for step in range(1, steps + 1):
        train_step(model, opt, torch.cat([batch(step, r) for r in range(WORLD)]))
        yield step, model


def fsdp_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    fully_shard(model.hidden)
    fully_shard(model)
    return model


def averagers() -> dict:
    return {"ema": EMA(EMA_DECAY), "lawa": LAWA(n=LAWA_K, every=LAWA_EVERY)}


def fsdp_run(out: Path, name: str, *, stop_at: int = STEPS, resume_from: Path | None = None) -> None:
    """FSDP2 training with both averagers; a training checkpoint at CHECKPOINT_STEP; averages saved at the end."""
    rank = dist.get_rank()
    model, avgs = fsdp_model(), averagers()
    opt = make_optimizer(model)
    start = 1
    if resume_from is not None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=resume_from / "train")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for stem, avg in avgs.items():
            assert load_state(avg, resume_from, stem=stem)
        start = CHECKPOINT_STEP + 1
    for step in range(start, stop_at + 1):
        train_step(model, opt, batch(step, rank))
        for avg in avgs.values():
            avg.update(model, step)
        if step == CHECKPOINT_STEP and resume_from is None:
            ckpt = out / f"{name}-step{step}"
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt / "train")
            for stem, avg in avgs.items():
                save_state(avg, ckpt, stem=stem)
        if step == KILL_STEP and stop_at == KILL_STEP:
            os._exit(0)  # killed: no cleanup, nothing after the step-4 checkpoint survives
    for stem, avg in avgs.items():
        avg.save(out / f"{name}-{stem}-dcp", model, format="dcp")
        avg.save(out / f"{name}-{stem}-hf", model, format="hf")
    check_state_round_trip(avgs["ema"], out / f"{name}-ema-state", model)


def check_state_round_trip(avg, folder: Path, model: torch.nn.Module) -> None:
    """save_state -> load_state into a fresh averager on the same rank: the same tensors, bit for bit."""
    save_state(avg, folder)
    dist.barrier()
    fresh = EMA(EMA_DECAY)
    assert load_state(fresh, folder)
    fresh.update(model, avg.last_step)  # a repeated step: ignored, but checks the shards still fit
    for key, value in avg.averaged_state_dict().items():
        assert torch.equal(value, fresh.averaged_state_dict()[key]), key


def ddp_run(out: Path) -> None:
    """DDP training with both averagers; every rank updates, the averages are saved in both formats."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(Net())
    opt = make_optimizer(model)
    avgs = averagers()
    for step in range(1, STEPS + 1):
        train_step(model, opt, batch(step, dist.get_rank()))
        for avg in avgs.values():
            avg.update(model.module, step)
    for stem, avg in avgs.items():
        avg.save(out / f"ddp-{stem}-dcp", model.module, format="dcp")
        avg.save(out / f"ddp-{stem}-hf", model.module, format="hf")
    torch.save(avgs["ema"].averaged_state_dict(), out / f"ddp-ema-rank{dist.get_rank()}.pt")


def phema_run(out: Path, kind: str) -> None:
    """A power EMA and phema snapshots (``tests/test_posthoc_ddp.py``) under DDP or FSDP2: the snapshots every
    PHEMA_EVERY steps into ``{kind}-phema/``, the power EMA as ``{kind}-power_ema-hf`` and its state round trip."""
    from torch.nn.parallel import DistributedDataParallel

    from ckptmerge.online.phema import PowerEMASnapshots
    from ckptmerge.online.rules import PowerEMA

    torch.manual_seed(0)
    model = DistributedDataParallel(Net()) if kind == "ddp" else fsdp_model()
    inner = getattr(model, "module", model)
    opt = make_optimizer(model)
    power, snapshots = PowerEMA(POWER_SIGMA_REL), PowerEMASnapshots(PHEMA_SIGMA_RELS, every=PHEMA_EVERY)
    for step in range(1, STEPS + 1):
        train_step(model, opt, batch(step, dist.get_rank()))
        power.update(inner, step)
        snapshots.update(inner, step)
        if snapshots.snapshot_due(step):
            snapshots.save_snapshots(out / f"{kind}-phema", inner)  # a collective
    power.save(out / f"{kind}-power_ema-hf", inner, format="hf")
    save_state(snapshots, out / f"{kind}-phema-state", stem="phema")
    dist.barrier()
    fresh = PowerEMASnapshots(PHEMA_SIGMA_RELS, every=PHEMA_EVERY)
    assert load_state(fresh, out / f"{kind}-phema-state", stem="phema")
    for a, b in zip(snapshots.profiles, fresh.profiles):
        for key, value in a.averaged_state_dict().items():
            assert torch.equal(value, b.averaged_state_dict()[key]), key


def worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    """One spawned rank: join the gloo group, then ``run(mode, out)``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    run(mode, Path(out))
    dist.destroy_process_group()


def run(mode: str, out: Path) -> None:
    """``mode``: "killed" (FSDP2 run killed at KILL_STEP), or "full" (uninterrupted FSDP2, resumed FSDP2, DDP)."""
    if mode == "killed":
        fsdp_run(out, "killed", stop_at=KILL_STEP)
    elif mode == "phema":
        phema_run(out, "ddp")
        phema_run(out, "fsdp")
    else:
        fsdp_run(out, "fsdp")
        fsdp_run(out, "resumed", resume_from=out / f"killed-step{CHECKPOINT_STEP}")
        ddp_run(out)
        failing_publish(out)


def failing_publish(out: Path) -> None:
    """A write that fails on rank 1 only: every rank raises, and nothing is published or left behind."""
    from ckptmerge.errors import CkptMergeError
    from ckptmerge.online.collective import publish_together

    def write(tmp: Path) -> None:
        (tmp / f"part{dist.get_rank()}").write_text("x")
        if dist.get_rank() == 1:
            raise OSError("disk full (injected)")

    try:
        publish_together(out / "failed-save", write)
    except (CkptMergeError, OSError) as exc:
        (out / f"failed-save-rank{dist.get_rank()}.txt").write_text(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":  # torchrun --nproc-per-node 2 tests/sharded_runs.py OUT killed; ... OUT full
    dist.init_process_group("gloo")
    run(sys.argv[2], Path(sys.argv[1]))
    dist.destroy_process_group()
