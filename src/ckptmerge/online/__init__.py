"""Averaging during training: EMA, SWA, LAWA and PMA for any PyTorch loop (see ``averager.py``)."""

from ckptmerge.online.averager import Averager
from ckptmerge.online.rules import EMA, LAWA, PMA, SWA
from ckptmerge.online.spec import parse_average_spec

__all__ = ["EMA", "LAWA", "PMA", "SWA", "Averager", "parse_average_spec"]
