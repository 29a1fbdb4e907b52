"""PMA-init: continue training from merged weights (a better init, or a restart after a loss spike).

    init_from_merged(model, "out/sma-pre-spike", optimizer, optimizer_state="reset")

Optimizer-state policy:
- ``keep``: the optimizer's current state (Adam moments and step counts of the run being restarted,
  e.g. loaded from the last checkpoint) is kept and applied to the merged weights;
- ``reset``: the state is cleared, so Adam starts from zero moments (and restarts its bias correction).
The papers leave this open; ``ckptmerge reproduce`` compares both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptmerge.evaluation.evaluator import load_state_into
from ckptmerge.io.dispatch import open_checkpoint

OPTIMIZER_POLICIES = ("keep", "reset")


def init_from_merged(model: torch.nn.Module, merged: str | Path, optimizer: torch.optim.Optimizer | None = None,
                     optimizer_state: str = "keep") -> None:
    """Load the weights of checkpoint ``merged`` into ``model`` in place and apply the optimizer policy."""
    if optimizer_state not in OPTIMIZER_POLICIES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_POLICIES}, got {optimizer_state!r}")
    reader = open_checkpoint(merged)
    try:
        load_state_into(model, {k: reader.get(k).clone() for k in reader.keys()})
    finally:
        reader.close()
    if optimizer is not None and optimizer_state == "reset":
        optimizer.state.clear()
