"""Averaging during training: EMA, SWA, LAWA and PMA for any PyTorch loop (see ``averager.py``), the HF and
Lightning callbacks, and ``watch`` (a sidecar that merges a run while it trains).

May import ``evaluation``, ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""


from ckptmerge.online.averager import Averager
from ckptmerge.online.rules import EMA, LAWA, PMA, SWA
from ckptmerge.online.spec import parse_average_spec

__all__ = ["EMA", "LAWA", "PMA", "SWA", "Averager", "parse_average_spec"]
