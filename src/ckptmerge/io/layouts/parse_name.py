"""Step numbers in the checkpoint names people use.

    step-1000  step_1000  step1000 (Pythia revisions)   checkpoint-1000 (HF Trainer)
    iter_0001000 (Megatron)   global_step1000 (DeepSpeed)   ckpt_1000.pt   model_001000.safetensors
    epoch=0-step=1000.ckpt (Lightning)   ep0-ba1000-rank0.pt (Composer)
"""

from __future__ import annotations

import re

_STEP_NAME = re.compile(
    r"^(?:step|checkpoint|iter|ckpt|model|global_step|revision|rev)[-_]?(\d+)$", re.IGNORECASE)
_FRAMEWORK_NAMES = (re.compile(r"(?:^|-)step=(\d+)(?:-|$)"), re.compile(r"^ep\d+-ba(\d+)(?:-rank\d+)?$"))
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def parse_step(name: str) -> int | None:
    """Step number in a checkpoint name, or None. ``parse_step("iter_0001000") == 1000``."""
    stem = name
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _STEP_NAME.match(stem)
    if match:
        return int(match.group(1))
    for pattern in _FRAMEWORK_NAMES:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return None
