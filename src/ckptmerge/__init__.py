"""ckptmerge: checkpoint merging and weight averaging for LLM pre-training.

Three lines from a run directory to a merged model::

    import ckptmerge as cm
    refs = cm.select_last(cm.discover("runs/demo").checkpoints, 5, every_steps=200)
    cm.merge(refs, cm.compute_coeffs("ema", refs, alpha=0.2), "out/ema")
"""

__version__ = "0.1.0"

from ckptmerge.errors import CkptMergeError
from ckptmerge.evaluation.api import evaluate
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import Discovery, discover, parse_step
from ckptmerge.merging.offline import MergeResult, merge
from ckptmerge.merging.schedules import SCHEDULES, compute_coeffs
from ckptmerge.merging.select import select_last, select_range, select_steps

__all__ = [
    "CheckpointRef", "CkptMergeError", "Discovery", "MergeResult", "SCHEDULES", "compute_coeffs", "discover", "evaluate",
    "merge", "open_checkpoint", "parse_step", "select_last", "select_range", "select_steps", "__version__",
]
