"""litgpt ``pretrain``: ``step-0000000N/lit_model.pth`` holding ``{"model", "optimizer", "iter_num", "step_count", ...}``.

The step is ``step_count`` (optimizer steps, as in the folder name); a ``lit_model.pth`` that is
a bare state dict (``final/``, converted checkpoints) is read as one.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    copy_folder_state,
    payload,
    step_from_name,
    torch_weights_reader,
    write_back_torch_file,
)

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

WEIGHTS = "lit_model.pth"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file()


def read_step(path: Path) -> StepInfo:
    state = payload(path / WEIGHTS)
    step = as_int(state.get("step_count")) if isinstance(state, dict) else None
    if step is not None:
        return StepInfo(step, source=f"{WEIGHTS}:step_count")
    return StepInfo(step_from_name(path, r"^step-(\d+)$"))


def open_checkpoint(path: Path):
    from ckptmerge.io.torch_reader import find_weights

    return torch_weights_reader(path, path / WEIGHTS, lambda state: find_weights(path / WEIGHTS, state), "litgpt")


def write_back(path: Path, merged: dict, dest: Path) -> None:
    copy_folder_state(path, dest)
    (dest / WEIGHTS).unlink(missing_ok=True)
    write_back_torch_file(path / WEIGHTS, dest / WEIGHTS, lambda state: state.get("model", state), merged)


LAYOUT = Layout("litgpt", detect, read_step, open_checkpoint, write_back=write_back)
