"""MosaicML Composer: ``ep{E}-ba{B}-rank{R}.pt`` files and a ``latest-rank0.pt`` symlink.

The file is ``{"state": {"model": ..., "timestamp": {...}, ...}, "rng": [...]}``: the weights are
``state.model`` (the ComposerModel's attribute, ``model.``, stripped when shared by every name),
the step is ``timestamp["batch"]`` and the tokens ``timestamp["token"]``. Its numpy RNG state,
``TorchVersion`` and ``timedelta`` objects are read as inert placeholders.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    payload,
    torch_weights_reader,
    write_back_torch_file,
)
from ckptmerge.io.layouts.parse_name import parse_step

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

LATEST = re.compile(r"^latest-rank\d+\.pt$")


def _state(path: Path) -> dict | None:
    return _state_of(payload(path))


def _state_of(obj: object) -> dict | None:
    state = obj.get("state") if isinstance(obj, dict) else None
    return state if isinstance(state, dict) and isinstance(state.get("model"), dict) else None


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt" and not LATEST.match(path.name) and _state(path) is not None


def pointer(path: Path) -> str | None:
    return "Composer's pointer to the newest checkpoint" if LATEST.match(path.name) else None


def read_step(path: Path) -> StepInfo:
    from ckptmerge.io.safe_pickle import Placeholder, state_fields

    stamp = _state(path).get("timestamp")
    if isinstance(stamp, Placeholder):
        stamp = state_fields(stamp)
    stamp = stamp if isinstance(stamp, dict) else {}
    step = as_int(stamp.get("batch"))
    if step is None:
        return StepInfo(parse_step(path.name))
    return StepInfo(step, tokens_seen=as_int(stamp.get("token")) or None, source="state.timestamp")


def open_checkpoint(path: Path):
    return torch_weights_reader(path, path, lambda obj: _state_of(obj)["model"], "composer", strip_attribute=True)


def write_back(path: Path, merged: dict, dest: Path) -> None:
    write_back_torch_file(path, dest / path.name, lambda obj: obj["state"]["model"], merged, strip_attribute=True)


LAYOUT = Layout("composer", detect, read_step, open_checkpoint, pointer, write_back=write_back)
