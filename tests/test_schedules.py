"""Every schedule against coefficients computed by hand."""

import itertools
from pathlib import Path

import pytest

from ckptmerge.errors import ScheduleError, UnknownNameError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.schedules import SCHEDULES, SIGNED, check_coeffs, compute_coeffs


def refs(steps, tokens_per_step=1000):
    return [CheckpointRef(Path(f"step-{s}"), step=s, tokens_seen=s * tokens_per_step) for s in steps]


FIVE = refs([100, 200, 300, 400, 500])


def close(a, b):
    assert a == pytest.approx(b, abs=1e-12)


def test_sma_is_uniform():
    close(compute_coeffs("sma", FIVE), [0.2] * 5)


def test_wma_is_proportional_to_position():
    close(compute_coeffs("wma", FIVE), [1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15])


def test_ema_alpha_follows_pma_recursion_seeded_with_first():
    # M1 = t1; M2 = .5 t2 + .5 t1; M3 = .5 t3 + .25 t2 + .25 t1
    close(compute_coeffs("ema", refs([1, 2, 3]), alpha=0.5), [0.25, 0.25, 0.5])
    a = 0.2
    close(compute_coeffs("ema", FIVE, alpha=a), [0.8**4, a * 0.8**3, a * 0.8**2, a * 0.8, a])


def test_ema_half_life_handles_irregular_spacing():
    # gaps 100 and 300 steps, half-life 100: beta = 0.5 then 0.125
    # M2 = .5 t2 + .5 t1 ; M3 = .875 t3 + .125 M2
    close(compute_coeffs("ema", refs([100, 200, 500]), half_life=100), [0.0625, 0.0625, 0.875])


def test_ema_half_life_in_tokens_equals_alpha_form_when_regular():
    by_tokens = compute_coeffs("ema", FIVE, half_life_tokens=100_000)  # gap 100k tokens = one half-life
    close(by_tokens, compute_coeffs("ema", FIVE, alpha=0.5))


def test_swa_from_start_step_and_fraction():
    close(compute_coeffs("swa", FIVE, start_step=300), [0, 0, 1 / 3, 1 / 3, 1 / 3])
    close(compute_coeffs("swa", FIVE, start_fraction=0.75), [0, 0, 0, 0.5, 0.5])  # start = 375
    close(compute_coeffs("swa", FIVE), [0.2] * 5)


def test_linear_decay_is_uniform_and_minus_sqrt_favours_oldest():
    close(compute_coeffs("linear-decay", FIVE), [0.2] * 5)
    s = [(k / 4) ** 0.5 for k in range(4)]  # f(k/4) = 1 - sqrt(k/4)
    expected = [s[1] - s[0], s[2] - s[1], s[3] - s[2], 1 - s[3]]
    close(compute_coeffs("minus-sqrt", refs([1, 2, 3, 4])), expected)
    assert expected[0] == max(expected)


def test_cosine_decay_drops():
    import math
    f = [0.5 * (1 + math.cos(math.pi * k / 2)) for k in range(2)] + [0.0]
    close(compute_coeffs("cosine-decay", refs([1, 2])), [f[0] - f[1], f[1] - f[2]])


def test_pair_and_custom():
    close(compute_coeffs("pair", refs([1, 2]), lam=0.7), [0.3, 0.7])
    close(compute_coeffs("custom", refs([1, 2, 3]), weights=[0.5, 0.25, 0.25]), [0.5, 0.25, 0.25])


@pytest.mark.parametrize("name", sorted(SCHEDULES.keys() - SIGNED))  # phema: tests/test_posthoc_ema.py
def test_every_schedule_sums_to_one_and_is_non_negative(name):
    params = {"ema": {"alpha": 0.3}, "pair": {"lam": 0.6}, "custom": {"weights": [0.1, 0.2, 0.3, 0.4]}}
    window = FIVE[:2] if name == "pair" else FIVE[:4]
    coeffs = compute_coeffs(name, window, **params.get(name, {}))
    assert sum(coeffs) == pytest.approx(1.0, abs=1e-12)
    assert all(c >= 0 for c in coeffs)


def test_policy_rejects_unnormalized_and_negative_unless_opted_in():
    with pytest.raises(ScheduleError, match="--normalize"):
        compute_coeffs("custom", FIVE[:3], weights=[1, 2, 3])
    close(compute_coeffs("custom", FIVE[:3], weights=[1, 2, 3], normalize=True), [1 / 6, 2 / 6, 3 / 6])
    close(compute_coeffs("custom", FIVE[:3], weights=[1, 2, 3], allow_unnormalized=True), [1, 2, 3])
    with pytest.raises(ScheduleError, match="--allow-negative"):
        compute_coeffs("pair", FIVE[:2], lam=1.5)
    close(compute_coeffs("pair", FIVE[:2], lam=1.5, allow_negative=True), [-0.5, 1.5])
    with pytest.raises(ScheduleError):
        check_coeffs([float("nan"), 1.0])


def test_bad_parameters_are_named():
    with pytest.raises(ScheduleError, match="does not take"):
        compute_coeffs("sma", FIVE, alpha=0.3)
    with pytest.raises(ScheduleError, match="exactly one"):
        compute_coeffs("ema", FIVE)
    with pytest.raises(ScheduleError, match="alpha"):
        compute_coeffs("ema", FIVE, alpha=1.5)
    with pytest.raises(ScheduleError, match="exactly two"):
        compute_coeffs("pair", FIVE, lam=0.5)
    with pytest.raises(ScheduleError, match="tokens"):
        compute_coeffs("ema", [CheckpointRef(Path("a"), step=1), CheckpointRef(Path("b"), step=2)], half_life_tokens=5)
    with pytest.raises(UnknownNameError, match="choose one of: sma"):
        compute_coeffs("lawa", FIVE)


def test_old_half_life_steps_keyword_warns_and_gives_the_same_coefficients():
    with pytest.warns(DeprecationWarning, match="half_life_steps= is deprecated; use half_life="):
        old = compute_coeffs("ema", refs([100, 200, 500]), half_life_steps=100)
    close(old, [0.0625, 0.0625, 0.875])
    with pytest.raises(ScheduleError, match="not both half_life and its old name"):
        compute_coeffs("ema", FIVE, half_life=100, half_life_steps=100)


def megatron_weights(kind, n):
    """Megatron's weighted merge (WSM, arXiv 2507.17634): checkpoint i of n (oldest first) gets the drop of the
    decay curve over its interval, g(i/n) - g((i+1)/n), with g(x) = 1 - x ("linear") or 1 - sqrt(x) ("minus-sqrt")."""
    curve = {"linear": lambda x: 1 - x, "minus_sqrt": lambda x: 1 - x ** 0.5}[kind]
    return [curve(i / n) - curve((i + 1) / n) for i in range(n)]


@pytest.mark.parametrize("n", range(2, 17))
def test_decay_schedules_equal_megatrons_weighted_merge_with_reverse_and_scramble(n):
    window = refs(range(100, 100 * (n + 1), 100))
    for name, kind in (("linear_decay", "linear"), ("minus_sqrt", "minus_sqrt")):
        expected = megatron_weights(kind, n)
        close(compute_coeffs(name, window), expected)
        close(compute_coeffs(name, window, reverse=1), expected[::-1])
        scrambled = compute_coeffs(name, window, scramble=7)
        assert sorted(scrambled) == pytest.approx(sorted(expected), abs=1e-12)
        assert compute_coeffs(name, window, scramble=7) == scrambled  # a fixed shuffle per seed
        close(compute_coeffs(name, window, scramble=0), expected)
    if n >= 4:  # some seed moves a weight (a no-op shuffle would pass the checks above)
        assert any(compute_coeffs("minus_sqrt", window, scramble=s) != megatron_weights("minus_sqrt", n)
                   for s in range(1, 4))


def test_reverse_and_scramble_in_the_method_language():
    from ckptmerge.errors import ConfigError
    from ckptmerge.merging.method_spec import parse_method

    spec = parse_method("minus_sqrt:n=8,reverse=1")
    assert spec.params == {"reverse": 1} and spec.n == 8
    close(spec.coeffs(refs(range(100, 900, 100))), megatron_weights("minus_sqrt", 8)[::-1])
    for text, words in [("minus_sqrt:reverse=2", "reverse is 0 or 1"), ("linear_decay:scramble=-1", "seed"),
                        ("minus_sqrt:reverse=1,scramble=3", "not both"), ("sma:reverse=1", "not 'reverse'")]:
        with pytest.raises(ConfigError, match=words):
            parse_method(text)


def test_anytime_ema_over_long_gaps_is_the_product_of_per_step_decays():
    """Gaps of 1 to 60,000 steps (the long ones take the digamma form): each gap s -> t decays the older mass by
    prod_{r=s+1..t} 2^(-1/(f r)), multiplied out here in fp64 step by step."""
    steps, fraction = [1, 2, 40, 25_000, 85_000, 85_001], 5.0  # a long memory: every coefficient matters
    betas = []
    for s, t in itertools.pairwise(steps):
        log2_beta = 0.0
        for r in range(s + 1, t + 1):
            log2_beta -= 1.0 / (fraction * r)
        betas.append(2.0 ** log2_beta)
    expected = [1.0]
    for beta in betas:
        expected = [c * beta for c in expected] + [1.0 - beta]
    got = compute_coeffs("ema", refs(steps), half_life_fraction=fraction)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
