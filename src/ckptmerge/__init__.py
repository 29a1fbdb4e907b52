"""ckptmerge: checkpoint merging and weight averaging for LLM pre-training.

Three lines from a run directory to a merged model::

    import ckptmerge as cm
    refs = cm.select_last(cm.discover("runs/demo").checkpoints, 5, every_steps=200)
    cm.merge(refs, cm.compute_coeffs("ema", refs, alpha=0.2), "out/ema")

The names below are loaded on first use (PEP 562), so that ``import ckptmerge`` and the command
line's start-up (``ckptmerge --help``, ``ckptmerge inspect``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "CkptMergeError": "ckptmerge.errors",
    "evaluate": "ckptmerge.evaluation.api",
    "open_checkpoint": "ckptmerge.io.dispatch",
    "CheckpointRef": "ckptmerge.merging.checkpoint",
    "Discovery": "ckptmerge.merging.discover",
    "discover": "ckptmerge.merging.discover",
    "parse_step": "ckptmerge.merging.discover",
    "MergeResult": "ckptmerge.merging.offline",
    "merge": "ckptmerge.merging.offline",
    "SCHEDULES": "ckptmerge.merging.schedules",
    "compute_coeffs": "ckptmerge.merging.schedules",
    "select_last": "ckptmerge.merging.select",
    "select_range": "ckptmerge.merging.select",
    "select_steps": "ckptmerge.merging.select",
}

__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ckptmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from ckptmerge.errors import CkptMergeError
    from ckptmerge.evaluation.api import evaluate
    from ckptmerge.io.dispatch import open_checkpoint
    from ckptmerge.merging.checkpoint import CheckpointRef
    from ckptmerge.merging.discover import Discovery, discover, parse_step
    from ckptmerge.merging.offline import MergeResult, merge
    from ckptmerge.merging.schedules import SCHEDULES, compute_coeffs
    from ckptmerge.merging.select import select_last, select_range, select_steps
