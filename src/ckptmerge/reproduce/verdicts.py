"""Verdicts computed from numbers: every claim is tested per seed, then the seeds are combined.

A per-seed number is a paired difference (same evaluation windows) with its standard error, or a
yes/no observation. The rules, stated in every report:

- ``less`` (expected: difference < 0): *holds* when every seed shows it beyond 2 SE, *does not hold*
  when no seed does, *inconclusive* when the seeds disagree.
- ``close`` (expected: |difference| <= tol): *holds* when every seed has |d| + 2 SE <= tol, *does not
  hold* when every seed has |d| - 2 SE > tol, else *inconclusive*.
- ``at_most`` (expected: difference <= tol): *holds* when every seed has d + 2 SE <= tol, *does not
  hold* when every seed has d - 2 SE > tol, else *inconclusive*.
- ``yes`` (a per-seed observation): *holds* when true for every seed, *does not hold* when false for
  every seed, else *inconclusive*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Z = 2.0
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
RULES = __doc__.split("The rules, stated in every report:")[1].strip()


@dataclass
class Claim:
    """One testable statement of a paper and what each seed measured for it."""

    statement: str
    kind: str                       # less | close | at_most | yes
    per_seed: list = field(default_factory=list)   # [(diff, se)] or [bool]
    tol: float = 0.0
    detail: str = ""                # how the number is computed

    @property
    def verdict(self) -> str:
        return verdict(self.kind, self.per_seed, self.tol)

    def numbers(self) -> str:
        if self.kind == "yes":
            return ", ".join("yes" if v else "no" for v in self.per_seed)
        return ", ".join(f"{d:+.4f} ± {se:.4f}" for d, se in self.per_seed)

    def to_dict(self) -> dict:
        return {"statement": self.statement, "kind": self.kind, "tol": self.tol, "detail": self.detail,
                "per_seed": [list(v) if isinstance(v, tuple) else v for v in self.per_seed], "verdict": self.verdict}


def verdict(kind: str, per_seed: Sequence, tol: float = 0.0) -> str:
    if not per_seed:
        return UNSURE
    if kind == "yes":
        passed = [bool(v) for v in per_seed]
    elif kind == "less":
        passed = [d + Z * se < 0 for d, se in per_seed]
        return HOLDS if all(passed) else FAILS if not any(passed) else UNSURE
    elif kind == "close":
        passed = [abs(d) + Z * se <= tol for d, se in per_seed]
        failed = [abs(d) - Z * se > tol for d, se in per_seed]
        return HOLDS if all(passed) else FAILS if all(failed) else UNSURE
    elif kind == "at_most":
        passed = [d + Z * se <= tol for d, se in per_seed]
        failed = [d - Z * se > tol for d, se in per_seed]
        return HOLDS if all(passed) else FAILS if all(failed) else UNSURE
    else:
        raise ValueError(f"unknown claim kind {kind!r}")
    return HOLDS if all(passed) else FAILS if not any(passed) else UNSURE


def combine(a: tuple[float, float], b: tuple[float, float], sign: float = -1.0) -> tuple[float, float]:
    """``a + sign * b`` for two independent differences, with their standard errors added in quadrature."""
    return a[0] + sign * b[0], (a[1] ** 2 + b[1] ** 2) ** 0.5
