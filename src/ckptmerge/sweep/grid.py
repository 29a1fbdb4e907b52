"""The sweep grid: merge methods, window sizes N and spacings V, and the points along a run.

Methods are written in the one method language (``merging/method_spec.py``): ``sma``, ``wma``,
``ema:alpha=0.2``, ``minus_sqrt``; the window sizes and spacings come from the grid, not the method.
Over a folder of power-EMA snapshots (``RUN/phema``) the methods are post-hoc EMAs,
``phema:sigma_rel=0.05/0.07/0.10`` (one per width): each merges every snapshot up to the point, with no N or V.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ckptmerge.errors import ConfigError, SelectionError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.method_spec import MethodSpec, parse_method, split_spec
from ckptmerge.merging.schedules import is_signed
from ckptmerge.merging.select import select_last


@dataclass(frozen=True)
class MergeSpec:
    """One merge recipe of the grid: ``method`` over the last ``n`` checkpoints spaced ``every_steps`` apart."""

    method: str
    n: int            # 0 for a post-hoc EMA: every snapshot up to the point
    every_steps: int

    @property
    def label(self) -> str:
        return self.method if self.n == 0 else f"{self.method} N={self.n} V={self.every_steps}"

    def window(self, refs: Sequence[CheckpointRef], end_step: int) -> list[CheckpointRef] | None:
        """The checkpoints this recipe merges at ``end_step``, or None when the run has no such window."""
        if self.n == 0:
            window = [r for r in refs if r.step is not None and r.step <= end_step]
            return window or None
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


def expand_methods(methods: Sequence[str]) -> list[str]:
    """``phema:sigma_rel=0.05/0.07`` -> ``phema:sigma_rel=0.05``, ``phema:sigma_rel=0.07`` (one method per width);
    every other method as given."""
    out = []
    for text in methods:
        name, raw = split_spec(text, "sweep method")
        widths = raw.get("sigma_rel", "")
        if not is_posthoc(name) or "/" not in widths:
            out.append(text)
            continue
        rest = [f"{k}={v}" for k, v in raw.items() if k != "sigma_rel"]
        out += [f"{name}:" + ",".join([f"sigma_rel={w}", *rest]) for w in widths.split("/")]
    return out


def is_posthoc(method: str) -> bool:
    """Whether ``method`` solves over power-EMA snapshots (``phema``) rather than weighting a window of N."""
    return is_signed(method.strip())


def make_grid(methods: Sequence[str], ns: Sequence[int], every: Sequence[int]) -> list[MergeSpec]:
    """Every (method, N, V), and each post-hoc EMA once; methods are kept in their canonical text
    (``ema:0.2`` -> ``ema:alpha=0.2``)."""
    canonical = [str(parse_sweep_method(m)) for m in expand_methods(methods)]
    if any(n < 2 for n in ns) or any(v < 1 for v in every):
        raise ConfigError("--last values must be at least 2 and --every values at least 1 step")
    return [spec for m in canonical for spec in (
        [MergeSpec(m, 0, 0)] if is_posthoc(m) else [MergeSpec(m, n, v) for n in ns for v in every])]


def check_methods(methods: Sequence[str], refs: Sequence[CheckpointRef], run: object) -> None:
    """Post-hoc EMAs need a folder of power-EMA snapshots, and such a folder takes post-hoc EMAs only
    (the window methods would take two profiles' snapshots of one step for two checkpoints)."""
    snapshots = any(r.ema_gamma is not None for r in refs)
    wrong = [m for m in methods if is_posthoc(m) != snapshots]
    if wrong and snapshots:
        raise ConfigError(f"{run}: power-EMA snapshots, so --method {wrong[0]} cannot merge them; sweep the EMA "
                          f"width with --method phema:sigma_rel=0.03/0.05/0.07/0.10/0.15 (docs/posthoc-ema.md)")
    if wrong:
        raise ConfigError(f"{run}: plain checkpoints, but --method {wrong[0]} merges power-EMA snapshots; train "
                          f"with --average phema:sigma_rel=0.05/0.10,every=K and sweep RUN/phema")


def baseline_refs(refs: Sequence[CheckpointRef]) -> list[CheckpointRef]:
    """One checkpoint per step, the sweep's baseline: the raw checkpoints, or in a folder of power-EMA snapshots
    the narrowest profile's (the largest gamma: the closest to the raw weights)."""
    gammas = {r.ema_gamma for r in refs if r.ema_gamma is not None}
    if not gammas:
        return list(refs)
    return [r for r in refs if r.ema_gamma == max(gammas)]


def base_spacing(refs: Sequence[CheckpointRef]) -> int:
    """The most common gap between consecutive checkpoints, in steps (the run's save interval)."""
    gaps = [b.step - a.step for a, b in itertools.pairwise(refs)]
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
