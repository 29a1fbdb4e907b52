"""Framework run-directory layouts: one module per trainer (detection rule, true step, weights reader).

Adding a framework is one module with a ``LAYOUT`` and one line in ``LAYOUTS`` below. Order
matters: the first layout whose ``detect`` accepts an entry wins, so specific layouts come before
the generic DCP one. Entries no framework claims fall back to the plain layouts of ``io/layout.py``.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts import (accelerate, composer, deepspeed, hf_trainer, lightning, litgpt, megatron,
                                  nanogpt, olmo_core, torchtitan)
from ckptmerge.io.layouts.base import Layout, StepInfo
from ckptmerge.io.tensor_info import CheckpointReader

LAYOUTS: tuple[Layout, ...] = (
    megatron.LAYOUT, olmo_core.LAYOUT, deepspeed.LAYOUT, litgpt.LAYOUT, hf_trainer.LAYOUT, accelerate.LAYOUT,
    lightning.LAYOUT, composer.LAYOUT, nanogpt.LAYOUT, torchtitan.LAYOUT,
)

__all__ = ["LAYOUTS", "Layout", "StepInfo", "match_layout", "open_framework_checkpoint", "pointer_reason"]


def match_layout(path: Path) -> Layout | None:
    """The framework layout that claims ``path`` (a run-directory entry), or None."""
    return next((layout for layout in LAYOUTS if layout.detect(path)), None)


def pointer_reason(path: Path) -> str | None:
    """Why ``path`` is a pointer or a copy of another checkpoint (to skip), or None."""
    if path.is_symlink():
        target = path.resolve()
        if target.parent == path.parent.resolve():
            return f"a symlink to {target.name}"
    return next((why for layout in LAYOUTS if (why := layout.pointer(path))), None)


def open_framework_checkpoint(path: Path) -> CheckpointReader | None:
    """A reader when a framework layout claims ``path``; None for the plain layouts."""
    layout = match_layout(path)
    return layout.open(path) if layout is not None else None
