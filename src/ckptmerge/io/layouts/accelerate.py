"""HF Accelerate ``save_state``: a folder with ``model.safetensors``, ``optimizer.bin``, ``random_states_0.pkl``.

With ``automatic_checkpoint_naming`` the folders are ``checkpoints/checkpoint_K`` where K counts
saves, not steps: the step is then read from the optimizer state (Adam-family ``step``, the largest over
parameters) or the LR scheduler's ``last_epoch``. A folder named by the user (``step_1000``) keeps its name's step.
At a URL only ``optimizer.bin``'s data.pkl and its per-parameter ``step`` records are read (by range).
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    copy_folder_state,
    detect_layout,
    open_plain_checkpoint,
    payload,
)
from ckptmerge.io.layouts.parse_name import parse_step

MARKERS = ("optimizer.bin", "random_states_0.pkl", "scheduler.bin")
AUTOMATIC_NAME = re.compile(r"^checkpoint_(\d+)$")


def detect(path: Path) -> bool:
    return (path.is_dir() and any((path / m).is_file() for m in MARKERS)
            and not (path / "trainer_state.json").is_file() and detect_layout(path) is not None)


def read_step(path: Path) -> StepInfo:
    if not AUTOMATIC_NAME.match(path.name):
        return StepInfo(parse_step(path.name))
    if (path / "optimizer.bin").is_file():
        step = _optimizer_step(payload(path / "optimizer.bin"))
        if step is not None:
            return StepInfo(step, source="optimizer.bin")
    if (path / "scheduler.bin").is_file():
        state = payload(path / "scheduler.bin")
        step = as_int(state.get("last_epoch")) if isinstance(state, dict) else None
        if step is not None:
            return StepInfo(step, source="scheduler.bin")
    return StepInfo(None, source=f"{path.name}: automatic naming counts saves, and no optimizer step was found")


def _optimizer_step(state: object) -> int | None:
    per_param = state.get("state", {}) if isinstance(state, dict) else {}
    values = [s.get("step") for s in per_param.values() if isinstance(s, dict)]
    _fetch_remote_values(values)
    steps = [s for s in map(as_int, values) if s is not None]
    return max(steps) if steps else None


def _fetch_remote_values(values: list) -> None:
    """An ``optimizer.bin`` at a URL holds meta tensors: its step records are read side by side (one small range
    each, never the moments), before ``as_int`` asks for them one by one."""
    if any(getattr(v, "stored_value", None) is not None for v in values):
        from ckptmerge.io.remote_torch import fetch_stored_values

        fetch_stored_values(values)


LAYOUT = Layout("accelerate", detect, read_step, open_plain_checkpoint, write_back=lambda path, merged, dest: copy_folder_state(path, dest))
