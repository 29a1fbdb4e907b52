"""Verdict rules on hand-made numbers: each branch of each rule."""

from ckptmerge.reproduce.verdicts import FAILS, HOLDS, UNSURE, Claim, combine, verdict


def test_less_needs_every_seed_beyond_two_standard_errors():
    assert verdict("less", [(-0.05, 0.01), (-0.03, 0.01)]) == HOLDS
    assert verdict("less", [(-0.05, 0.01), (-0.01, 0.01)]) == UNSURE     # second seed within 2 SE
    assert verdict("less", [(0.02, 0.01), (-0.01, 0.01)]) == FAILS       # no seed beyond 2 SE
    assert verdict("less", []) == UNSURE


def test_close_and_at_most_use_the_tolerance_both_ways():
    assert verdict("close", [(0.005, 0.002), (-0.01, 0.003)], tol=0.02) == HOLDS
    assert verdict("close", [(0.05, 0.005), (-0.04, 0.005)], tol=0.02) == FAILS
    assert verdict("close", [(0.05, 0.005), (0.0, 0.001)], tol=0.02) == UNSURE
    assert verdict("at_most", [(-0.3, 0.01), (0.01, 0.001)], tol=0.02) == HOLDS
    assert verdict("at_most", [(0.05, 0.01), (0.1, 0.01)], tol=0.02) == FAILS


def test_yes_and_combine():
    assert verdict("yes", [True, True]) == HOLDS
    assert verdict("yes", [False, False]) == FAILS
    assert verdict("yes", [True, False]) == UNSURE
    d, se = combine((-0.05, 0.03), (-0.01, 0.04))
    assert abs(d + 0.04) < 1e-12 and abs(se - 0.05) < 1e-12
    claim = Claim("x", "less", per_seed=[(-0.1, 0.01)])
    assert claim.to_dict()["verdict"] == HOLDS and "-0.1000" in claim.numbers()
