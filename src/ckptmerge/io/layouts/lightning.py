"""PyTorch Lightning ``ModelCheckpoint``: ``epoch=E-step=S.ckpt`` files, ``last.ckpt`` a copy of the newest.

The weights are ``state_dict``, named with the LightningModule's attribute (``model.``), which is
stripped when every name shares it (and put back by ``--as-checkpoint``). The step is
``global_step``.
Sharded strategies (``ModelParallelStrategy``, ``FSDPStrategy(state_dict_type="sharded")``) write
``epoch=E-step=S.ckpt/`` folders: DCP with the weights under ``state_dict.`` (ModelParallel) or
``model.`` (FSDP), ``optimizer_K.`` entries (skipped), and ``meta.pt`` with ``global_step``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    dcp_reader,
    payload,
    strip_attribute_prefix,
    torch_weights_reader,
    write_back_torch_file,
)
from ckptmerge.io.layouts.parse_name import parse_step
from ckptmerge.io.wrapper_names import unwrap_names

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def _is_lightning(state: object) -> bool:
    return isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and (
        "pytorch-lightning_version" in state or "global_step" in state)


SHARDED_META = "meta.pt"
CONTAINERS = ("state_dict.", "model.")


def _is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_META).is_file()


def detect(path: Path) -> bool:
    if path.suffix != ".ckpt":
        return False
    return _is_sharded(path) or path.is_file() and _is_lightning(payload(path))


def _sharded_names(folder: Path, fqns: list[str]) -> dict[str, str]:
    """Model name -> DCP key: the container (``state_dict.`` / ``model.``), wrappers and the module attribute removed."""
    container = next((c for c in CONTAINERS if all(f.startswith(c) for f in fqns)), "")
    stored = unwrap_names(folder, [f[len(container):] for f in fqns])
    named, _ = strip_attribute_prefix(stored)
    return {name: container + short for name, short in named.items()}


def pointer(path: Path) -> str | None:
    return "Lightning's copy of the newest checkpoint (save_last)" if LAST.match(path.name) else None


def read_step(path: Path) -> StepInfo:
    state = payload(path / SHARDED_META if _is_sharded(path) else path)
    step = as_int(state.get("global_step")) if isinstance(state, dict) else None
    return StepInfo(step, source="global_step") if step is not None else StepInfo(parse_step(path.name))


def open_checkpoint(path: Path):
    if _is_sharded(path):
        return dcp_reader(path, names=_sharded_names)
    return torch_weights_reader(path, path, lambda state: state["state_dict"], "lightning", strip_attribute=True)


def write_back(path: Path, merged: dict, dest: Path) -> None:
    from ckptmerge.io.dcp_rewrite import rewrite_dcp

    if _is_sharded(path):
        return rewrite_dcp(path, dest / path.name, merged, names=_sharded_names)
    write_back_torch_file(path, dest / path.name, lambda state: state["state_dict"], merged, strip_attribute=True)


LAYOUT = Layout("lightning", detect, read_step, open_checkpoint, pointer, write_back=write_back)
