"""PyTorch Lightning ``ModelCheckpoint``: ``epoch=E-step=S.ckpt`` files, ``last.ckpt`` a copy of the newest.

The weights are ``state_dict``, named with the LightningModule's attribute (``model.``), which is
stripped when every name shares it (and put back by ``--as-checkpoint-of``). The step is
``global_step``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptmerge.io.layouts.base import Layout, StepInfo, as_int, payload, weights_reader
from ckptmerge.io.layouts.parse_name import parse_step
from ckptmerge.io.torch_reader import check_kept_fraction

LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def _is_lightning(state: object) -> bool:
    return isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and (
        "pytorch-lightning_version" in state or "global_step" in state)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".ckpt" and _is_lightning(payload(path))


def pointer(path: Path) -> str | None:
    return "Lightning's copy of the newest checkpoint (save_last)" if LAST.match(path.name) else None


def read_step(path: Path) -> StepInfo:
    step = as_int(payload(path).get("global_step"))
    return StepInfo(step, source="global_step") if step is not None else StepInfo(parse_step(path.name))


def open_checkpoint(path: Path):
    state = payload(path)
    check_kept_fraction(path, state["state_dict"], state)
    return weights_reader(path, state["state_dict"], "lightning", strip_attribute=True)


LAYOUT = Layout("lightning", detect, read_step, open_checkpoint, pointer)
