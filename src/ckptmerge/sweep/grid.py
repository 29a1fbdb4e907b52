"""The sweep grid: merge methods, window sizes N and spacings V, and the points along a run.

Methods are written in the one method language (``merging/method_spec.py``): ``sma``, ``wma``,
``ema:alpha=0.2``, ``minus_sqrt``; the window sizes and spacings come from the grid, not the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptmerge.errors import ConfigError, SelectionError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.method_spec import MethodSpec, parse_method
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
        return parse_method(self.method).coeffs(window)


def parse_sweep_method(text: str) -> MethodSpec:
    """A method of the grid: ``parse_method``, refusing a window of its own (the grid's ``--last`` / ``--every``)."""
    spec = parse_method(text)
    if spec.n is not None or spec.every is not None:
        raise ConfigError(f"sweep method {text!r}: give window sizes with --last and spacings with --every, "
                          f"not inside the method (write {MethodSpec(spec.name, spec.params)})")
    return spec


def make_grid(methods: Sequence[str], ns: Sequence[int], every: Sequence[int]) -> list[MergeSpec]:
    """Every (method, N, V); methods are kept in their canonical text (``ema:0.2`` -> ``ema:alpha=0.2``)."""
    canonical = [str(parse_sweep_method(m)) for m in methods]
    if any(n < 2 for n in ns) or any(v < 1 for v in every):
        raise ConfigError("--last values must be at least 2 and --every values at least 1 step")
    return [MergeSpec(m, n, v) for m in canonical for n in ns for v in every]


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
