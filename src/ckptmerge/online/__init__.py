"""Averaging during training: EMA, SWA, LAWA and PMA for any PyTorch loop (see ``averager.py``), under DDP and
FSDP2 too (``sharding.py``, ``saving.py``, ``state_files.py``), the HF and Lightning callbacks, and ``watch``
(a sidecar that merges a run while it trains).

May import ``evaluation``, ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""


from ckptmerge.online.averager import Averager
from ckptmerge.online.rules import EMA, LAWA, PMA, SWA
from ckptmerge.online.spec import parse_average_spec
from ckptmerge.online.state_files import load_state, save_state

__all__ = ["EMA", "LAWA", "PMA", "SWA", "Averager", "load_state", "parse_average_spec", "save_state"]
