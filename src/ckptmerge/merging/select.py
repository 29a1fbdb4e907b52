"""Choose the window of a series to merge: last N at a spacing, an explicit list, or a step range.

All functions take checkpoints ordered by step (as ``discover`` returns them) and return the
selection oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

from ckptmerge.errors import SelectionError
from ckptmerge.merging.checkpoint import CheckpointRef


def select_last(refs: Sequence[CheckpointRef], n: int, *, every_steps: int | None = None,
                every_tokens: int | None = None, end_step: int | None = None) -> list[CheckpointRef]:
    """The last ``n`` checkpoints ending at ``end_step`` (default: the newest).

    With ``every_steps`` (or ``every_tokens``) = V, walks back from the end on the grid
    end, end - V, end - 2V, ... and takes the checkpoint exactly on each grid point.

    Raises:
        SelectionError: too few checkpoints, an end step that is not a checkpoint, or a grid point
            with no checkpoint (the message lists the missing points and the spacings available).
    """
    if n < 1:
        raise SelectionError(f"--last must be at least 1, got {n}")
    if every_steps is not None and every_tokens is not None:
        raise SelectionError("give --every (steps) or --every-tokens, not both")
    refs = _up_to(refs, end_step)
    if every_steps is None and every_tokens is None:
        if len(refs) < n:
            raise SelectionError(f"asked for the last {n} checkpoints but only {len(refs)} exist up to step {refs[-1].step}")
        return list(refs[-n:])
    unit, spacing = ("steps", every_steps) if every_steps is not None else ("tokens", every_tokens)
    if spacing <= 0:
        raise SelectionError(f"spacing must be positive, got {spacing} {unit}")
    position = {(_tokens(r) if unit == "tokens" else r.step): r for r in refs}
    end = max(position)
    grid = [end - j * spacing for j in range(n)]
    missing = [g for g in grid if g not in position]
    if missing:
        raise SelectionError(
            f"no checkpoint at {unit} {missing[:8]}{' ...' if len(missing) > 8 else ''} on the grid "
            f"{end} - k*{spacing}. {_spacing_hint(sorted(position), unit)}")
    return [position[g] for g in reversed(grid)]


def select_steps(refs: Sequence[CheckpointRef], steps: Sequence[int]) -> list[CheckpointRef]:
    """The checkpoints at exactly these steps, oldest first."""
    by_step = {r.step: r for r in refs}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise SelectionError(f"no checkpoint at steps {missing}; available: {_short(sorted(by_step))}")
    return [by_step[s] for s in sorted(set(steps))]


def select_range(refs: Sequence[CheckpointRef], start: int, stop: int) -> list[CheckpointRef]:
    """All checkpoints with ``start <= step <= stop``."""
    chosen = [r for r in refs if start <= r.step <= stop]
    if not chosen:
        raise SelectionError(f"no checkpoint in steps [{start}, {stop}]; available: {_short([r.step for r in refs])}")
    return chosen


def _up_to(refs: Sequence[CheckpointRef], end_step: int | None) -> list[CheckpointRef]:
    if not refs:
        raise SelectionError("the series is empty")
    if end_step is None:
        return list(refs)
    if end_step not in {r.step for r in refs}:
        raise SelectionError(f"--end-step {end_step} is not a checkpoint; available: {_short([r.step for r in refs])}")
    return [r for r in refs if r.step <= end_step]


def _tokens(ref: CheckpointRef) -> int:
    if ref.tokens_seen is None:
        raise SelectionError(f"{ref.path}: tokens seen unknown, so a spacing in tokens cannot be applied. "
                             f"Pass --tokens-per-step, or select with --every (steps).")
    return ref.tokens_seen


def _spacing_hint(positions: list[int], unit: str) -> str:
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    if not gaps:
        return "Only one checkpoint is available."
    step = 0
    for g in gaps:
        step = gcd(step, g)
    return f"Checkpoints are spaced by multiples of {step} {unit} (smallest gap {min(gaps)}); choose a multiple of that."


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"{values[:5]} ... {values[-5:]} ({len(values)} in all)"
