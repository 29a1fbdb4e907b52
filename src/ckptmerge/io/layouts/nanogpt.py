"""nanoGPT ``train.py``: ``ckpt.pt`` = ``{"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}``.

The weights are ``model`` (``_orig_mod.`` from ``torch.compile`` stripped), never the loose
``best_val_loss`` tensor beside it; the step is ``iter_num``.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    payload,
    torch_weights_reader,
    write_back_torch_file,
)
from ckptmerge.io.layouts.parse_name import SUFFIXES, parse_step

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix in SUFFIXES and path.suffix != ".safetensors"):
        return False
    state = payload(path)
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and "iter_num" in state


def read_step(path: Path) -> StepInfo:
    step = as_int(payload(path).get("iter_num"))
    return StepInfo(step, source="iter_num") if step is not None else StepInfo(parse_step(path.name))


def open_checkpoint(path: Path):
    from ckptmerge.io.torch_reader import find_weights

    return torch_weights_reader(path, path, lambda state: find_weights(path, state), "nanogpt")


def write_back(path: Path, merged: dict, dest: Path) -> None:
    write_back_torch_file(path, dest / path.name, lambda state: state["model"], merged)


LAYOUT = Layout("nanogpt", detect, read_step, open_checkpoint, write_back=write_back)
