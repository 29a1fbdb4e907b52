"""The sweep grid: merge methods, window sizes N and spacings V, and the points along a run.

Methods are written like ``--average`` specs: ``sma``, ``wma``, ``ema:0.2`` (EMA with alpha 0.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptmerge.errors import ConfigError, SelectionError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.schedules import compute_coeffs
from ckptmerge.merging.select import select_last


@dataclass(frozen=True)
class MergeSpec:
    """One merge recipe of the grid: ``method`` over the last ``n`` checkpoints spaced ``every_steps`` apart."""

    method: str
    n: int
    every_steps: int

    @property
    def label(self) -> str:
        return f"{self.method} N={self.n} V={self.every_steps}"

    def window(self, refs: Sequence[CheckpointRef], end_step: int) -> list[CheckpointRef] | None:
        """The checkpoints this recipe merges at ``end_step``, or None when the run has no such window."""
        try:
            return select_last(refs, self.n, every_steps=self.every_steps, end_step=end_step)
        except SelectionError:
            return None

    def coeffs(self, window: Sequence[CheckpointRef]) -> list[float]:
        schedule, params = parse_method(self.method)
        return compute_coeffs(schedule, window, **params)


def parse_method(method: str) -> tuple[str, dict]:
    """``"ema:0.2"`` -> ``("ema", {"alpha": 0.2})``; ``"sma"`` -> ``("sma", {})``."""
    name, _, arg = method.partition(":")
    if name in ("sma", "wma") and not arg:
        return name, {}
    if name == "ema":
        try:
            alpha = float(arg)
        except ValueError:
            raise ConfigError(f"method {method!r}: write EMA as ema:ALPHA, e.g. ema:0.2") from None
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"method {method!r}: alpha must be in (0, 1]")
        return "ema", {"alpha": alpha}
    raise ConfigError(f"unknown method {method!r}; choose sma, wma or ema:ALPHA")


def make_grid(methods: Sequence[str], ns: Sequence[int], every: Sequence[int]) -> list[MergeSpec]:
    for method in methods:
        parse_method(method)
    if any(n < 2 for n in ns) or any(v < 1 for v in every):
        raise ConfigError("--n values must be at least 2 and --every values at least 1 step")
    return [MergeSpec(m, n, v) for m in methods for n in ns for v in every]


def base_spacing(refs: Sequence[CheckpointRef]) -> int:
    """The most common gap between consecutive checkpoints, in steps (the run's save interval)."""
    gaps = [b.step - a.step for a, b in zip(refs, refs[1:])]
    if not gaps:
        raise SelectionError("a sweep needs at least two checkpoints")
    return max(set(gaps), key=gaps.count)


def choose_points(refs: Sequence[CheckpointRef], at: Sequence[int] | None, n_points: int) -> list[int]:
    """``at`` when given (each must be a checkpoint), else ``n_points`` steps spread evenly, ending at the last."""
    steps = [r.step for r in refs]
    if at:
        missing = sorted(set(at) - set(steps))
        if missing:
            raise SelectionError(f"--at {missing}: no checkpoint at those steps; the run has {steps[:5]} ... {steps[-5:]}")
        return sorted(set(at))
    if n_points >= len(steps):
        return steps
    picks = {round(i * (len(steps) - 1) / (n_points - 1)) for i in range(n_points)} if n_points > 1 else {len(steps) - 1}
    return [steps[i] for i in sorted(picks)]
