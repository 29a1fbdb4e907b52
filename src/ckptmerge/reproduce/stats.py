"""Claims, their pooled effect over seeds, confidence intervals, Holm's step-down and the four outcomes.

Per seed a claim has a paired difference ``d_s`` (held-out losses on the same windows) and its window
standard error ``se_s``. Pooled over n seeds:

    effect = mean_s d_s,   SE^2 = var_s(d_s) / n + sum_s se_s^2 / n^2,   CI = effect +/- t_{n-1, 1-a/2} SE

(across-seed spread, t-distribution, plus the within-seed window SE). Outcomes, for margin m > 0:

- directional (``less``: effect < 0 claimed; ``greater``: effect > 0): *holds* when the whole CI is past
  the margin on the claimed side; *reversed* when past the margin on the other side; *no detectable
  effect* when the CI lies inside [-m, m]; else *inconclusive*.
- ``equivalent`` (|effect| <= m claimed): *holds* when the CI lies inside [-m, m]; *reversed* when it
  lies wholly outside on one side; else *inconclusive*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptmerge.errors import import_optional

sps = import_optional("scipy.stats", extra="reproduce", needed_by="reproduce (its statistics)")

HOLDS, REVERSED, NO_EFFECT, INCONCLUSIVE = "holds", "reversed", "no detectable effect", "inconclusive"
OUTCOMES = (HOLDS, REVERSED, NO_EFFECT, INCONCLUSIVE)
DIRECTIONS = ("less", "greater", "equivalent")
ALPHA = 0.05
FIRST_SEEDS = 3  # with more seeds, reports also show the outcome of the first 3 (what the extra seeds changed)
RULES = __doc__.split("(across-seed spread, t-distribution, plus the within-seed window SE). ")[1].strip()


def pooled(per_seed: Sequence[tuple[float, float]]) -> tuple[float, float, int]:
    """(mean over seeds, combined SE, degrees of freedom n - 1) of per-seed ``(d, se)`` pairs."""
    n = len(per_seed)
    if n < 2:
        raise ValueError("a pooled interval needs at least two seeds")
    ds = [d for d, _ in per_seed]
    mean = sum(ds) / n
    between = sum((d - mean) ** 2 for d in ds) / (n - 1)
    within = sum(se ** 2 for _, se in per_seed) / n ** 2
    return mean, math.sqrt(between / n + within), n - 1


def interval(per_seed: Sequence[tuple[float, float]], alpha: float = ALPHA) -> tuple[float, float, float]:
    """(effect, ci_low, ci_high) at level ``1 - alpha``."""
    mean, se, df = pooled(per_seed)
    half = sps.t.ppf(1 - alpha / 2, df) * se
    return mean, mean - half, mean + half


def p_value(per_seed: Sequence[tuple[float, float]]) -> float:
    """Two-sided p-value of effect = 0 under the pooled t statistic."""
    mean, se, df = pooled(per_seed)
    if se == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * sps.t.sf(abs(mean) / se, df))


def outcome(direction: str, ci_low: float, ci_high: float, margin: float) -> str:
    """One of the four outcomes for a CI and a margin (rules in the module docstring)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    if not margin > 0 or math.isnan(ci_low) or math.isnan(ci_high):
        return INCONCLUSIVE
    inside = -margin <= ci_low and ci_high <= margin
    if direction == "equivalent":
        return HOLDS if inside else REVERSED if (ci_low > margin or ci_high < -margin) else INCONCLUSIVE
    below, above = ci_high < -margin, ci_low > margin
    claimed, other = (below, above) if direction == "less" else (above, below)
    return HOLDS if claimed else REVERSED if other else NO_EFFECT if inside else INCONCLUSIVE


@dataclass
class Claim:
    """One testable statement and what each seed measured for it."""

    key: str
    statement: str
    direction: str
    detail: str = ""
    primary: bool = False
    seeds: list = field(default_factory=list)
    per_seed: list = field(default_factory=list)   # [(d, se)]
    margins: list = field(default_factory=list)    # per seed, from half A; the claim's margin is their mean
    alpha: float = ALPHA                           # set by holm() for primary claims
    note: str = ""
    first: dict | None = None                      # result() of the first FIRST_SEEDS seeds (side_by_side)

    def add(self, seed: int, diff: tuple[float, float], margin: float) -> None:
        self.seeds.append(seed)
        self.per_seed.append((float(diff[0]), float(diff[1])))
        self.margins.append(float(margin))

    @property
    def margin(self) -> float:
        return sum(self.margins) / len(self.margins) if self.margins else float("nan")

    def result(self) -> dict:
        if len(self.per_seed) >= 2:
            effect, lo, hi = interval(self.per_seed, self.alpha)
            p = p_value(self.per_seed)
        else:
            effect = self.per_seed[0][0] if self.per_seed else float("nan")
            lo = hi = p = float("nan")
        out = outcome(self.direction, lo, hi, self.margin) if len(self.per_seed) >= 3 else INCONCLUSIVE
        return {"claim": self.statement, "key": self.key, "outcome": out, "effect": effect, "ci_low": lo,
                "ci_high": hi, "margin": self.margin, "direction": self.direction, "primary": self.primary,
                "ci_level": 1 - self.alpha, "p_value": p, "seeds": list(self.seeds),
                "per_seed": [d for d, _ in self.per_seed], "per_seed_se": [se for _, se in self.per_seed],
                "detail": self.detail, "note": self.note,
                **({"first_seeds": self.first} if self.first is not None else {})}

    def head(self, k: int) -> Claim:
        """The same claim on its first ``k`` seeds only (alpha back at the default, for its own Holm)."""
        return Claim(self.key, self.statement, self.direction, self.detail, self.primary, self.seeds[:k],
                     self.per_seed[:k], self.margins[:k], note=self.note)


def holm(claims: Sequence[Claim], alpha: float = ALPHA) -> None:
    """Holm's step-down levels for the primary claims: rank r (by p-value) gets ``alpha / (m - r + 1)``."""
    family = [c for c in claims if c.primary and len(c.per_seed) >= 2]
    ranked = sorted(family, key=lambda c: p_value(c.per_seed))
    m = len(ranked)
    for rank, claim in enumerate(ranked, start=1):
        claim.alpha = alpha / (m - rank + 1)


def side_by_side(claims: Sequence[Claim], k: int = FIRST_SEEDS, alpha: float = ALPHA) -> None:
    """When any claim has more than ``k`` seeds, give each the outcome of its first ``k`` seeds (``first``).

    The first-``k`` claims form their own Holm family, so the record reads as the report the first ``k``
    seeds alone would have written. Call after ``holm`` on the full claims.
    """
    if not any(len(c.seeds) > k for c in claims):
        return
    heads = [c.head(k) for c in claims]
    holm(heads, alpha)
    for claim, head in zip(claims, heads):
        result = head.result()
        claim.first = {key: result[key] for key in ("outcome", "effect", "ci_low", "ci_high", "margin", "ci_level",
                                                     "seeds")}


def combine(a: tuple[float, float], b: tuple[float, float], sign: float = -1.0) -> tuple[float, float]:
    """``a + sign * b`` for two differences, SEs added in quadrature (conservative for positively correlated ones)."""
    return a[0] + sign * b[0], math.hypot(a[1], b[1])
