"""``parse_method``: the one method language, checked against coefficients computed here in fp64 NumPy."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from ckptmerge.errors import ConfigError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.method_spec import MethodSpec, parse_method, split_spec
from ckptmerge.merging.schedules import compute_coeffs

STEPS = np.array([100, 200, 400, 700, 800, 1000, 1100, 1300], dtype=np.float64)  # irregular gaps


def refs(steps):
    return [CheckpointRef(Path(f"step-{int(s)}"), step=int(s), tokens_seen=int(s) * 512) for s in steps]


def ema_alpha_reference(n: int, alpha: float) -> np.ndarray:
    """PMA's recursion M_1 = theta_1, M_i = alpha theta_i + (1 - alpha) M_{i-1}, run on the identity basis."""
    merged = np.eye(n)[0]
    for i in range(1, n):
        merged = alpha * np.eye(n)[i] + (1 - alpha) * merged
    return merged


def ema_half_life_reference(positions: np.ndarray, half_life: float) -> np.ndarray:
    merged = np.eye(len(positions))[0]
    for i in range(1, len(positions)):
        beta = 0.5 ** ((positions[i] - positions[i - 1]) / half_life)
        merged = (1 - beta) * np.eye(len(positions))[i] + beta * merged
    return merged


def minus_sqrt_reference(n: int) -> np.ndarray:
    levels = np.append(1.0 - np.sqrt(np.arange(n) / n), 0.0)
    return levels[:-1] - levels[1:]


@pytest.mark.parametrize("text, window, expected", [
    ("sma:n=5", STEPS[-5:], np.full(5, 0.2)),
    ("ema:alpha=0.2", STEPS, ema_alpha_reference(8, 0.2)),
    ("ema:half_life=2000", STEPS, ema_half_life_reference(STEPS, 2000.0)),
    ("ema:half_life_tokens=300000", STEPS, ema_half_life_reference(STEPS * 512, 300000.0)),
    ("minus_sqrt:n=8", STEPS, minus_sqrt_reference(8)),
    ("wma", STEPS[-4:], np.arange(1, 5) / 10.0),
    ("custom:weights=0.2/0.3/0.5", STEPS[-3:], np.array([0.2, 0.3, 0.5])),
    ("swa:start_step=700", STEPS, (STEPS >= 700) / (STEPS >= 700).sum()),
    ("pair:lam=0.7", STEPS[-2:], np.array([0.3, 0.7])),
])
def test_parsed_methods_give_the_reference_coefficients(text, window, expected):
    spec = parse_method(text)
    assert spec.coeffs(refs(window)) == pytest.approx(expected.tolist(), abs=1e-12)


def test_fields_and_canonical_text_round_trip():
    spec = parse_method("minus-sqrt:n=8,every=200")
    assert (spec.name, spec.params, spec.n, spec.every) == ("minus_sqrt", {}, 8, 200)
    assert str(spec) == "minus_sqrt:n=8,every=200"
    custom = parse_method("custom: weights = 0.2/0.3/0.5 ")
    assert custom.params == {"weights": (0.2, 0.3, 0.5)} and str(custom) == "custom:weights=0.2/0.3/0.5"
    for text in ("sma", "ema:alpha=0.2", "ema:half_life=2000,n=4", "swa:start_fraction=0.75"):
        assert str(parse_method(text)) == text
        assert parse_method(str(parse_method(text))) == parse_method(text)


def test_params_use_the_schedules_own_names():
    spec = parse_method("ema:half_life=2000")
    assert spec.params == {"half_life": 2000.0}
    assert spec.coeffs(refs(STEPS)) == compute_coeffs("ema", refs(STEPS), half_life=2000.0)


@pytest.mark.parametrize("text, words", [
    ("bogus:n=3", ["unknown method 'bogus'", "sma", "ema", "minus_sqrt"]),
    ("ema:beta=0.3", ["ema takes alpha, half_life, half_life_tokens, half_life_fraction, n, every", "'beta'"]),
    ("ema:alpha=abc", ["bad value for alpha", "'abc'"]),
    ("ema:alpha=1.5", ["alpha must be in (0, 1]"]),
    ("ema", ["exactly one of"]),
    ("ema:alpha=0.2,half_life=100", ["exactly one of"]),
    ("sma:n=0", ["n must be a positive integer"]),
    ("sma:every=x", ["every must be a positive integer"]),
    ("sma:n", ["'n' is not key=value"]),
    ("custom:weights=0.2/x", ["bad value for weights", "0.2/0.3/0.5"]),
    ("ema:alpha=nan", ["alpha must be finite"]),
    ("sma:n=3,n=4", ["n given twice"]),
])
def test_bad_methods_are_one_line_config_errors(text, words):
    with pytest.raises(ConfigError) as caught:
        parse_method(text)
    message = str(caught.value)
    assert "\n" not in message and f"method {text!r}" in message
    for word in words:
        assert word in message


def test_sweeps_old_ema_form_still_parses_with_a_notice():
    with pytest.warns(DeprecationWarning, match=r"'ema:0.2' is deprecated; use ema:alpha=0.2"):
        spec = parse_method("ema:0.2")
    assert spec == MethodSpec("ema", {"alpha": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_method("ema:alpha=0.2")  # the new form is silent


def test_split_spec_leaves_keys_to_the_caller():
    assert split_spec("lawa:n=5, every=200") == ("lawa", {"n": "5", "every": "200"})
    assert split_spec("sma") == ("sma", {})
