"""Merge state dicts held in memory through the same plan and engine as file merges.

Online averagers (ring buffers of snapshots) and the weight search use this: no disk, the same
validation, fp32 accumulation, non-float copy and tie handling as ``ckptmerge.merging.offline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.io.state_dict_reader import StateDictReader
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.engine import DEFAULT_CHUNK_BYTES, run_engine
from ckptmerge.merging.plan import build_plan


class DictSink:
    """Collects merged chunks into whole tensors, keyed by name."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device | str = "cpu"):
        self.tensors = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
        self._filled = dict.fromkeys(shapes, 0)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """The next rows of ``name``, after those written so far."""
        start = self._filled[name]
        self.write_rows(name, start, chunk)
        self._filled[name] = start + (chunk.shape[0] if chunk.dim() else 1)

    def write_rows(self, name: str, start_row: int, chunk: torch.Tensor) -> None:
        """Rows ``start_row...`` of ``name`` (threads may write disjoint rows at once)."""
        target = self.tensors[name]
        if target.dim() == 0:
            target.copy_(chunk.reshape(()))
            return
        target[start_row:start_row + chunk.shape[0]].copy_(chunk)


def merge_state_dicts(states: Sequence[dict[str, torch.Tensor]], coeffs: Sequence[float], *,
                      out_dtype: torch.dtype | None = None, accum_dtype: torch.dtype = torch.float32,
                      allow_nonfinite: bool = False, labels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``sum_i coeffs[i] * states[i]`` for float tensors; non-float tensors from the last state.

    ``labels`` name the states in error messages (default ``state-0``, ``state-1``, ...).
    """
    labels = list(labels or [f"state-{i}" for i in range(len(states))])
    readers = [StateDictReader({k: v.detach() for k, v in s.items()}, Path(label), layout="memory")
               for s, label in zip(states, labels)]
    refs = [CheckpointRef(Path(label)) for label in labels]
    plan = build_plan(readers, refs, list(coeffs), out_dtype=out_dtype, accum_dtype=accum_dtype)
    device = next(iter(states[-1].values())).device
    sink = DictSink({t.name: (t.shape, t.out_dtype) for t in plan.tasks}, device=device)
    run_engine(plan, readers, sink, chunk_bytes=DEFAULT_CHUNK_BYTES, allow_nonfinite=allow_nonfinite)
    return sink.tensors
