"""Averaging during training: EMA, SWA, LAWA and PMA for any PyTorch loop (see ``averager.py``), under DDP and
FSDP2 too (``sharding.py``, ``saving.py``, ``state_files.py``), the HF and Lightning callbacks, and ``watch``
(a sidecar that merges a run while it trains).

May import ``evaluation``, ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> its module, loaded on first use (PEP 562): importing one module of this room (``online.spec``
# for ``train``'s flags, ``watch``) does not import torch through the averagers
_HOMES = {
    "Averager": "ckptmerge.online.averager",
    "EMA": "ckptmerge.online.rules", "LAWA": "ckptmerge.online.rules", "PMA": "ckptmerge.online.rules",
    "SWA": "ckptmerge.online.rules", "PowerEMA": "ckptmerge.online.rules",
    "PowerEMASnapshots": "ckptmerge.online.phema",
    "parse_average_spec": "ckptmerge.online.spec",
    "load_state": "ckptmerge.online.state_files", "save_state": "ckptmerge.online.state_files",
}

__all__ = ["EMA", "LAWA", "PMA", "SWA", "Averager", "PowerEMA", "PowerEMASnapshots", "load_state",
           "parse_average_spec", "save_state"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'ckptmerge.online' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ckptmerge.online.averager import Averager
    from ckptmerge.online.phema import PowerEMASnapshots
    from ckptmerge.online.rules import EMA, LAWA, PMA, SWA, PowerEMA
    from ckptmerge.online.spec import parse_average_spec
    from ckptmerge.online.state_files import load_state, save_state
