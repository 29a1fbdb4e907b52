"""Composer, litgpt and OLMo-core runs, built from each framework's documented on-disk format.

These packages cannot be installed beside torch 2.13 (mosaicml resolves to a 2021 release; litgpt and
ai2-olmo-core have no release compatible with the pinned versions), so the files are written here the
way their save code writes them: Composer's ``{"state": {"model", "optimizers", "timestamp", ...}, "rng"}``
with numpy RNG state, ``TorchVersion`` and ``timedelta``; litgpt's ``fabric.save`` of
``{"model", "optimizer", "iter_num", "step_count"}``; OLMo-core's DCP ``model_and_optim/`` whose metadata
names OLMo-core's own storage-info dataclass, plus ``train/rank0.pt``.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
import sys
import types

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.torch_version import TorchVersion

from trainer_checks import assert_merge_matches, fp64_mean


def _train(steps: int, every: int, save) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0:
            save(step, model, opt)


def test_composer_run(tmp_path):
    run_dir = tmp_path / "checkpoints"
    run_dir.mkdir()

    def save(step, model, opt):
        stamp = {"iteration": 0, "epoch": 0, "batch": step, "sample": 4 * step, "token": 48 * step,
                 "batch_in_epoch": step, "total_wct": datetime.timedelta(seconds=step), "epoch_wct": datetime.timedelta(0)}
        state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                 "optimizers": {"AdamW": opt.state_dict()}, "schedulers": [], "algorithms": [], "callbacks": {},
                 "scaler": None, "timestamp": stamp, "rank_zero_seed": 17, "run_name": "tiny",
                 "integrations": {"composer_version": TorchVersion("0.32.1")}}
        name = f"ep0-ba{step}-rank0.pt"
        torch.save({"state": state, "rng": [{"python": None, "numpy": np.random.get_state(),
                                              "torch": torch.random.get_rng_state()}]}, run_dir / name)
        (run_dir / "latest-rank0.pt").unlink(missing_ok=True)
        (run_dir / "latest-rank0.pt").symlink_to(name)

    _train(40, 10, save)
    states = [torch.load(run_dir / f"ep0-ba{s}-rank0.pt", weights_only=False)["state"]["model"] for s in (20, 30, 40)]
    assert_merge_matches(run_dir, tmp_path / "out", fp64_mean(states), [10, 20, 30, 40], "composer",
                         key_map=lambda k: k.removeprefix("model."))


def test_litgpt_run(tmp_path):
    run_dir = tmp_path / "out" / "pretrain" / "tiny"

    def save(step, model, opt):
        folder = run_dir / f"step-{step:08d}"
        folder.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "train_dataloader": {"epoch": 0},
                    "iter_num": 2 * step, "step_count": step}, folder / "lit_model.pth")
        (folder / "model_config.yaml").write_text("name: tiny\n")

    _train(40, 10, save)
    states = [torch.load(run_dir / f"step-{s:08d}" / "lit_model.pth", weights_only=False)["model"] for s in (20, 30, 40)]
    assert_merge_matches(run_dir, tmp_path / "merged", fp64_mean(states), [10, 20, 30, 40], "litgpt")


@dataclasses.dataclass
class _StorageInfo:  # stands in for olmo_core.distributed.checkpoint.filesystem._StorageInfo
    relative_path: str
    offset: int
    length: int
    transform_descriptors = None  # class attribute (not pickled): lets torch's own DCP reader load it


OLMO_MODULE = "olmo_core.distributed.checkpoint.filesystem"


class _FakeOlmoCore:
    """Makes ``olmo_core.distributed.checkpoint.filesystem._StorageInfo`` importable while in use."""

    def __enter__(self):
        parts = OLMO_MODULE.split(".")
        self.names = [".".join(parts[: i + 1]) for i in range(len(parts))]
        for name in self.names:
            sys.modules[name] = types.ModuleType(name)
        _StorageInfo.__module__, _StorageInfo.__qualname__ = OLMO_MODULE, "_StorageInfo"
        sys.modules[OLMO_MODULE]._StorageInfo = _StorageInfo

    def __exit__(self, *exc):
        for name in self.names:
            del sys.modules[name]


def _olmo_metadata(folder):
    """Rewrite the DCP metadata so its storage infos are OLMo-core's dataclass, as OLMo-core writes them."""
    with _FakeOlmoCore():
        meta = pickle.loads((folder / ".metadata").read_bytes())
        meta.storage_data = {k: _StorageInfo(v.relative_path, v.offset, v.length) for k, v in meta.storage_data.items()}
        (folder / ".metadata").write_bytes(pickle.dumps(meta))


def test_olmo_core_run(tmp_path):
    run_dir = tmp_path / "save_folder"

    def save(step, model, opt):
        folder = run_dir / f"step{step}"
        dcp.save({"model": model.state_dict(), "optim": {"lr": torch.tensor(0.05)}},
                 checkpoint_id=folder / "model_and_optim")
        _olmo_metadata(folder / "model_and_optim")
        (folder / "train").mkdir()
        torch.save({"global_step": step, "global_train_tokens_seen": 48 * step, "max_steps": 40,
                    "data_loader": {"epoch": 1}}, folder / "train" / "rank0.pt")

    _train(40, 10, save)
    meta = (run_dir / "step40" / "model_and_optim" / ".metadata").read_bytes()
    assert OLMO_MODULE.encode() in meta
    states = []
    for s in (20, 30, 40):  # torch DCP's own loader, into a model-shaped state dict
        sd = {"model": {k: torch.empty_like(v) for k, v in torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).state_dict().items()}}
        with _FakeOlmoCore():
            dcp.load(sd, checkpoint_id=run_dir / f"step{s}" / "model_and_optim")
        states.append(sd["model"])
    assert_merge_matches(run_dir, tmp_path / "out", fp64_mean(states), [10, 20, 30, 40], "olmo-core")


def test_megatron_torch_dist_run(tmp_path):
    """megatron-core installs, but its dist_checkpointing.save needs CUDA; the folders are built with torch DCP
    the way its torch_dist strategy lays them out: layer-stacked tensors, ``_extra_state`` byte shards, a
    ``SavePlan`` in the metadata's planner data, ``common.pt`` with ``iteration`` and ``args``, and the tracker file."""
    import argparse
    import io

    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
    from torch.distributed.checkpoint.metadata import MetadataIndex

    run_dir = tmp_path / "checkpoints"
    torch.manual_seed(0)
    stacked = {"decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 8, 8),
               "decoder.layers.mlp.linear_fc1.bias": torch.randn(2, 8), "decoder.final_layernorm.weight": torch.ones(8)}
    for step in (10, 20, 30, 40):
        stacked = {k: v + 0.01 * torch.randn_like(v) for k, v in stacked.items()}
        folder = run_dir / f"iter_{step:07d}"
        extra = {f"decoder.layers.mlp.linear_fc1._extra_state/shard_{i}_2": io.BytesIO(b"te-state") for i in range(2)}
        dcp.save({**stacked, **extra}, checkpoint_id=folder)
        meta = pickle.loads((folder / ".metadata").read_bytes())
        meta.planner_data = {"plan": SavePlan([WriteItem(MetadataIndex("x"), WriteItemType.BYTE_IO)])}
        (folder / ".metadata").write_bytes(pickle.dumps(meta))
        torch.save({"iteration": step, "args": argparse.Namespace(consumed_train_samples=4 * step, seq_length=16),
                    "checkpoint_version": 3.0}, folder / "common.pt")
        (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
        (run_dir / "latest_checkpointed_iteration.txt").write_text(str(step))
    states = []
    for step in (20, 30, 40):  # torch DCP's own loader
        sd = {k: torch.empty_like(v) for k, v in stacked.items()}
        dcp.load(sd, checkpoint_id=run_dir / f"iter_{step:07d}")
        states.append(sd)
    assert_merge_matches(run_dir, tmp_path / "out", fp64_mean(states), [10, 20, 30, 40], "megatron")
