"""The reproduction's statistics against scipy.stats and hand computations, and every outcome branch."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from ckptmerge.reproduce.stats import (
    HOLDS,
    INCONCLUSIVE,
    NO_EFFECT,
    REVERSED,
    Claim,
    holm,
    interval,
    outcome,
    p_value,
    pooled,
)


def test_pooled_without_window_error_is_the_one_sample_t_interval():
    ds = [-0.031, -0.012, -0.044, -0.020]
    effect, lo, hi = interval([(d, 0.0) for d in ds])
    ref = sps.ttest_1samp(ds, 0.0).confidence_interval(0.95)
    assert effect == pytest.approx(np.mean(ds))
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
    assert p_value([(d, 0.0) for d in ds]) == pytest.approx(sps.ttest_1samp(ds, 0.0).pvalue)


def test_pooled_adds_the_window_error_by_hand():
    per_seed = [(-0.03, 0.004), (-0.01, 0.002), (-0.02, 0.003)]
    mean, se, df = pooled(per_seed)
    between = np.var([-0.03, -0.01, -0.02], ddof=1) / 3            # 1e-4 / 3
    within = (0.004 ** 2 + 0.002 ** 2 + 0.003 ** 2) / 9              # 2.9e-5 / 9
    assert (mean, df) == (pytest.approx(-0.02), 2)
    assert se == pytest.approx(math.sqrt(1e-4 / 3 + 2.9e-5 / 9))
    assert se == pytest.approx(math.sqrt(between + within))
    _, lo, hi = interval(per_seed, alpha=0.1)
    assert hi - lo == pytest.approx(2 * sps.t.ppf(0.95, 2) * se)


@pytest.mark.parametrize("direction, lo, hi, margin, expected", [
    ("less", -0.05, -0.02, 0.01, HOLDS),            # past the margin on the claimed side
    ("less", 0.02, 0.05, 0.01, REVERSED),           # past the margin on the other side
    ("less", -0.008, 0.009, 0.01, NO_EFFECT),       # inside [-m, m]
    ("less", -0.03, 0.002, 0.01, INCONCLUSIVE),     # straddles the margin
    ("less", -0.03, -0.005, 0.01, INCONCLUSIVE),    # below 0 but not past the margin
    ("greater", 0.02, 0.05, 0.01, HOLDS),
    ("greater", -0.05, -0.02, 0.01, REVERSED),
    ("greater", -0.001, 0.001, 0.01, NO_EFFECT),
    ("greater", -0.001, 0.03, 0.01, INCONCLUSIVE),
    ("equivalent", -0.004, 0.006, 0.01, HOLDS),
    ("equivalent", 0.012, 0.05, 0.01, REVERSED),
    ("equivalent", -0.05, -0.02, 0.01, REVERSED),
    ("equivalent", -0.004, 0.02, 0.01, INCONCLUSIVE),
    ("less", -0.05, -0.02, 0.0, INCONCLUSIVE),      # no margin, no verdict
    ("less", float("nan"), float("nan"), 0.01, INCONCLUSIVE),
])
def test_every_outcome_branch(direction, lo, hi, margin, expected):
    assert outcome(direction, lo, hi, margin) == expected


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError):
        outcome("bigger", -1, 1, 0.1)


def test_claim_record_agrees_with_its_interval_and_needs_three_seeds():
    c = Claim("X", "x beats y", "less")
    for seed, d in enumerate([-0.05, -0.06, -0.055]):
        c.add(seed, (d, 0.002), 0.01)
    r = c.result()
    assert r["outcome"] == HOLDS and r["ci_high"] < -r["margin"] and r["seeds"] == [0, 1, 2]
    assert r["per_seed"] == [-0.05, -0.06, -0.055] and r["margin"] == pytest.approx(0.01)
    two = Claim("Y", "y", "less")
    two.add(0, (-0.05, 0.001), 0.01)
    two.add(1, (-0.06, 0.001), 0.01)
    assert two.result()["outcome"] == INCONCLUSIVE


def test_holm_levels_follow_the_p_value_ranks():
    strong, mid, weak, secondary = (Claim(k, k, "less", primary=k != "s") for k in ("a", "b", "c", "s"))
    for seed in range(3):
        strong.add(seed, (-0.1 - 0.001 * seed, 0.001), 0.01)
        mid.add(seed, (-0.05 + 0.01 * seed, 0.005), 0.01)
        weak.add(seed, (-0.01 + 0.02 * seed, 0.01), 0.01)
        secondary.add(seed, (-0.1, 0.001), 0.01)
    holm([weak, secondary, mid, strong])
    assert [strong.alpha, mid.alpha, weak.alpha] == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])
    assert secondary.alpha == 0.05
    lo, hi = strong.result()["ci_low"], strong.result()["ci_high"]
    mean, se, df = pooled(strong.per_seed)
    assert hi - lo == pytest.approx(2 * sps.t.ppf(1 - 0.05 / 6, df) * se)


def test_side_by_side_gives_each_claim_the_outcome_of_its_first_three_seeds_in_their_own_holm_family():
    from ckptmerge.reproduce.report import Experiment, render
    from ckptmerge.reproduce.stats import side_by_side

    def claim(key, ds, primary=True):
        c = Claim(key, f"claim {key}", "less", primary=primary)
        for seed, d in enumerate(ds):
            c.add(seed, (d, 0.002), 0.01)
        return c

    # five seeds decide what three cannot: the fourth and fifth seeds narrow the t interval
    a = claim("A", [-0.06, -0.02, -0.05, -0.045, -0.04])
    b = claim("B", [-0.03, -0.01, -0.02, -0.025, -0.02], primary=False)
    holm([a, b])
    side_by_side([a, b])
    for c in (a, b):
        head = Claim(c.key, c.statement, "less", primary=c.primary)
        for seed, d, m in zip(c.seeds[:3], c.per_seed[:3], c.margins[:3]):
            head.add(seed, d, m)
        holm([head])
        ref = head.result()
        got = c.result()["first_seeds"]
        assert got["seeds"] == [0, 1, 2] and got["outcome"] == ref["outcome"]
        assert (got["effect"], got["ci_low"], got["ci_high"]) == pytest.approx((ref["effect"], ref["ci_low"],
                                                                                ref["ci_high"]))
    assert a.result()["outcome"] == HOLDS and a.first["outcome"] == INCONCLUSIVE
    text = render(Experiment("e0", "E0", "paper", "statement", "setup", [a, b]), [a.result(), b.result()],
                  {"name": "test"})
    assert "first 3 seeds" in text and "inconclusive (changed)" in text
    # three seeds only: no side-by-side record, no extra column
    c = claim("C", [-0.06, -0.02, -0.05])
    holm([c])
    side_by_side([c])
    assert "first_seeds" not in c.result()
    assert "first 3 seeds" not in render(Experiment("e0", "E0", "p", "s", "u", [c]), [c.result()], {"name": "test"})
