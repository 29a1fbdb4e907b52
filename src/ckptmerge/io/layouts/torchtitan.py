"""torchtitan ``CheckpointManager`` and plain ``torch.distributed.checkpoint`` folders: ``step-N/.metadata``.

The weights are the model's FQNs (top level in torchtitan, under ``model.`` when the state dict
was ``{"model": ...}``); optimizer, LR-scheduler, dataloader and train-state entries are skipped.
The step is in the folder name. ``--as-checkpoint`` writes ``OUT/step-N/`` (io/dcp_rewrite.py).
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts.base import Layout, StepInfo, dcp_reader
from ckptmerge.io.layouts.parse_name import parse_step


def detect(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_step(path: Path) -> StepInfo:
    return StepInfo(parse_step(path.name))


def open_checkpoint(path: Path):
    return dcp_reader(path)  # torch: only when a checkpoint is opened


def write_back(path: Path, merged: dict, dest: Path) -> None:
    from ckptmerge.io.dcp_rewrite import rewrite_dcp

    rewrite_dcp(path, dest / path.name, merged)


LAYOUT = Layout("torchtitan/dcp", detect, read_step, open_checkpoint, write_back=write_back)
