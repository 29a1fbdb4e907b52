"""Merge coefficients from checkpoint metadata. Pure functions: no file is ever opened here.

Every schedule takes the selected checkpoints oldest first (theta_1 ... theta_N) and returns one
coefficient per checkpoint. The merged model is sum_i c_i * theta_i. See docs/methods.md for
the table of formulas and sources.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import warnings
from collections.abc import Callable, Sequence

from ckptmerge.errors import ScheduleError, UnknownNameError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.power_profiles import PosthocFit, profile_gamma, solve_posthoc

Schedule = Callable[..., list[float]]
SCHEDULES: dict[str, Schedule] = {}
SUM_TOLERANCE = 1e-6
RENAMED_PARAMS = {"half_life_steps": "half_life"}  # old keyword -> new; the old one warns for a release
SIGNED = frozenset({"phema"})  # least-squares coefficients: negative ones allowed, sum about (not exactly) 1


def register(fn: Schedule) -> Schedule:
    """Register a schedule under its function name (``linear_decay`` is also ``linear-decay``)."""
    key = fn.__name__.replace("_", "-")
    if key in SCHEDULES:
        raise ValueError(f"schedule {key!r} registered twice")
    SCHEDULES[key] = fn
    return fn


@register
def sma(refs: Sequence[CheckpointRef]) -> list[float]:
    """Simple moving average (LAWA's latest-k average, PMA's SMA): c_i = 1/N."""
    return [1.0 / len(refs)] * len(refs)


@register
def wma(refs: Sequence[CheckpointRef]) -> list[float]:
    """Weighted moving average (PMA): c_i = i / sum_j j, newest largest."""
    total = len(refs) * (len(refs) + 1) / 2
    return [i / total for i in range(1, len(refs) + 1)]


@register
def ema(refs: Sequence[CheckpointRef], alpha: float | None = None, half_life: float | None = None,
        half_life_tokens: float | None = None, half_life_fraction: float | None = None) -> list[float]:
    """Exponential moving average over checkpoints, seeded with the first (PMA's recursion).

    With ``alpha``: M_1 = theta_1, M_i = alpha * theta_i + (1 - alpha) * M_{i-1}, so
    c_1 = (1-alpha)^(N-1) and c_i = alpha (1-alpha)^(N-i) for i >= 2; the coefficients sum to 1.
    With a half-life H in steps (``half_life``; or ``half_life_tokens``), each gap of length d between
    neighbours decays the older mass by beta = 0.5^(d / H): exact for irregular spacing, and equal to the alpha form
    with alpha = 1 - 0.5^(V/H) when every gap is V.
    With ``half_life_fraction`` f (the anytime EMA), the half-life at step t is f * t: a gap s -> t decays by
    2^(-(1/(s+1) + ... + 1/t) / f), the product of the per-step decays 2^(-1/(f r)) of the online rule.
    """
    given = [p for p in (alpha, half_life, half_life_tokens, half_life_fraction) if p is not None]
    if len(given) != 1:
        raise ScheduleError("ema needs exactly one of alpha, half_life (steps), half_life_tokens or "
                            "half_life_fraction, e.g. ema:half_life=2000")
    if alpha is not None:
        if not 0.0 < alpha <= 1.0:
            raise ScheduleError(f"ema alpha must be in (0, 1], got {alpha}")
        betas = [1.0 - alpha] * (len(refs) - 1)
    elif half_life_fraction is not None:
        steps = _positions(refs, "steps")
        betas = [anytime_decay(a, b, half_life_fraction) for a, b in itertools.pairwise(steps)]
    else:
        unit = "steps" if half_life is not None else "tokens"
        length = half_life if half_life is not None else half_life_tokens
        if length <= 0:
            raise ScheduleError(f"ema half-life must be positive, got {length}")
        positions = _positions(refs, unit)
        betas = [0.5 ** ((b - a) / length) for a, b in zip(positions, positions[1:])]
    coeffs = [1.0]
    for beta in betas:
        coeffs = [c * beta for c in coeffs] + [1.0 - beta]
    return coeffs


def anytime_decay(last_step: int, step: int, half_life_fraction: float) -> float:
    """The anytime EMA's decay over the steps last_step+1 ... step: prod_r 2^(-1/(f r)) = 2^(-sum_r 1/r / f)."""
    if not half_life_fraction > 0:
        raise ScheduleError(f"half_life_fraction must be positive, got {half_life_fraction}")
    if not 0 <= last_step <= step:
        raise ScheduleError(f"anytime EMA: steps must increase and start at 0 or later, got {last_step} -> {step}")
    return 2.0 ** (-_harmonic_gap(last_step, step) / half_life_fraction)


def _harmonic_gap(start: int, stop: int) -> float:
    """1/(start+1) + ... + 1/stop: summed for gaps up to 10,000 steps, else psi(stop+1) - psi(start+1)."""
    if stop - start <= 10_000:
        return math.fsum(1.0 / r for r in range(start + 1, stop + 1))
    low, high = start + 1, stop + 1
    shift = math.fsum(1.0 / x for x in range(low, 100)) if low < 100 else 0.0  # psi(x) = psi(x + 1) - 1/x
    low = max(low, 100)
    return math.log1p((high - low) / low) + _psi_tail(high) - _psi_tail(low) + shift


def _psi_tail(x: float) -> float:
    """psi(x) - ln(x) for x >= 100, to about 1e-18 (the asymptotic series)."""
    inv2 = 1.0 / (x * x)
    return -0.5 / x - inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 / 252))


@register
def swa(refs: Sequence[CheckpointRef], start_step: int | None = None,
        start_fraction: float | None = None) -> list[float]:
    """Stochastic weight averaging: uniform over checkpoints with step >= start.

    ``start_fraction`` f sets start = f * (newest step), e.g. 0.75 for "SWA late" (LAWA paper).
    With neither, every checkpoint counts (equal to sma).
    """
    if start_step is not None and start_fraction is not None:
        raise ScheduleError("swa takes --start-step or --start-fraction, not both")
    steps = _positions(refs, "steps") if (start_step is not None or start_fraction is not None) else None
    if steps is None:
        return sma(refs)
    if start_fraction is not None:
        if not 0.0 <= start_fraction <= 1.0:
            raise ScheduleError(f"swa start fraction must be in [0, 1], got {start_fraction}")
        start_step = start_fraction * steps[-1]
    mask = [s >= start_step for s in steps]
    if not any(mask):
        raise ScheduleError(f"swa start {start_step} is after the newest checkpoint (step {steps[-1]})")
    return [m / sum(mask) for m in mask]


@register
def linear_decay(refs: Sequence[CheckpointRef], reverse: int | None = None,
                 scramble: int | None = None) -> list[float]:
    """Weights that emulate a linear LR decay over the window (WSM): f(x) = 1 - x.

    Coefficients are the drops of f at the checkpoint positions, c_k = f(k/N) - f((k+1)/N) with
    f(1) := 0, so the tail sum over checkpoints k..N is the LR multiplier the merge emulates for
    the updates between checkpoints k-1 and k. For linear decay every drop is 1/N (equal to sma).
    ``reverse=1`` gives the weights in the opposite order (newest largest), ``scramble=SEED`` a fixed
    shuffle of them (Megatron's ``__reverse`` / ``__scramble`` ablations of WSM).
    """
    return _reordered(_decay_weights(lambda x: 1.0 - x, len(refs)), reverse, scramble)


@register
def minus_sqrt(refs: Sequence[CheckpointRef], reverse: int | None = None,
               scramble: int | None = None) -> list[float]:
    """Weights that emulate a 1 - sqrt(x) LR decay (WSM, Megatron's weighted merge); oldest largest.
    ``reverse`` / ``scramble`` as for ``linear_decay``."""
    return _reordered(_decay_weights(lambda x: 1.0 - math.sqrt(x), len(refs)), reverse, scramble)


@register
def cosine_decay(refs: Sequence[CheckpointRef], reverse: int | None = None,
                 scramble: int | None = None) -> list[float]:
    """Weights that emulate a cosine LR decay, f(x) = (1 + cos(pi x)) / 2 (WSM family).
    ``reverse`` / ``scramble`` as for ``linear_decay``."""
    return _reordered(_decay_weights(lambda x: 0.5 * (1.0 + math.cos(math.pi * x)), len(refs)), reverse, scramble)


@register
def phema(refs: Sequence[CheckpointRef], sigma_rel: float | None = None, gamma: float | None = None) -> list[float]:
    """Post-hoc power-function EMA (EDM2): the least-squares combination of power-EMA snapshots
    (``train --average phema:...``; each ref's ``ema_gamma``) whose profile best matches the power EMA of
    ``sigma_rel`` (or ``gamma``) at the newest snapshot's step. Coefficients may be negative and sum to about 1
    (``merging/power_profiles.py``; merge.json records the fit)."""
    return phema_fit(refs, sigma_rel, gamma).coeffs


def phema_fit(refs: Sequence[CheckpointRef], sigma_rel: float | None = None,
              gamma: float | None = None) -> PosthocFit:
    """The post-hoc fit behind ``phema``: coefficients and relative residual of the profile match."""
    target = profile_gamma(sigma_rel, gamma, owner="phema")
    missing = [r.name for r in refs if r.ema_gamma is None]
    if missing:
        raise ScheduleError(f"phema needs power-EMA snapshots (ckptmerge.json averaged.gamma); {missing[:4]} are "
                            f"plain checkpoints. Train with --average phema:sigma_rel=0.05/0.10,every=K and merge "
                            f"RUN/phema")
    return solve_posthoc(_positions(refs, "steps"), [r.ema_gamma for r in refs], target)


@register
def pair(refs: Sequence[CheckpointRef], lam: float = 0.5) -> list[float]:
    """BO merging's pair: lambda on the newer of two checkpoints, 1 - lambda on the older."""
    if len(refs) != 2:
        raise ScheduleError(f"pair merges exactly two checkpoints, got {len(refs)} (use --last 2)")
    return [1.0 - lam, lam]


@register
def custom(refs: Sequence[CheckpointRef], weights: Sequence[float] | None = None) -> list[float]:
    """User-given weights, oldest first."""
    if weights is None:
        raise ScheduleError("custom needs --weights w1,w2,... (oldest first)")
    if len(weights) != len(refs):
        raise ScheduleError(f"custom: {len(weights)} weights for {len(refs)} checkpoints")
    return [float(w) for w in weights]


def _reordered(coeffs: list[float], reverse: int | None, scramble: int | None) -> list[float]:
    """``coeffs`` reversed (``reverse=1``) or shuffled by ``random.Random(scramble)`` (``scramble=SEED``)."""
    if reverse not in (None, 0, 1):
        raise ScheduleError(f"reverse is 0 or 1, got {reverse}")
    if scramble is not None and scramble < 0:
        raise ScheduleError(f"scramble is a seed (a non-negative integer; 0 leaves the order), got {scramble}")
    if reverse and scramble:
        raise ScheduleError("give reverse=1 or scramble=SEED, not both")
    if reverse:
        return coeffs[::-1]
    if scramble:
        order = list(range(len(coeffs)))
        random.Random(scramble).shuffle(order)
        return [coeffs[i] for i in order]
    return coeffs


def _decay_weights(f: Callable[[float], float], n: int) -> list[float]:
    levels = [f(k / n) for k in range(n)] + [0.0]
    return [levels[k] - levels[k + 1] for k in range(n)]


def _positions(refs: Sequence[CheckpointRef], unit: str) -> list[float]:
    values = [r.step if unit == "steps" else r.tokens_seen for r in refs]
    if any(v is None for v in values):
        unknown = [r.name for r, v in zip(refs, values) if v is None]
        raise ScheduleError(f"this schedule needs the {unit} of every checkpoint; unknown for {unknown}. "
                            f"Name checkpoints by step or pass --tokens-per-step.")
    return values


def get_schedule(name: str) -> Schedule:
    key = name.replace("_", "-")
    if key not in SCHEDULES:
        raise UnknownNameError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[key]


def is_signed(name: str) -> bool:
    """Whether schedule ``name`` solves for its coefficients (negative ones, a sum near 1) rather than
    choosing non-negative ones that sum to 1."""
    return name.replace("-", "_").partition(":")[0] in SIGNED


def schedule_params(name: str) -> list[str]:
    """Parameter names a schedule accepts (besides the checkpoints)."""
    return list(inspect.signature(get_schedule(name)).parameters)[1:]


def compute_coeffs(name: str, refs: Sequence[CheckpointRef], *, normalize: bool = False,
                   allow_unnormalized: bool = False, allow_negative: bool = False, **params: object) -> list[float]:
    """Run schedule ``name`` and enforce the coefficient policy.

    Coefficients must sum to 1 and be non-negative unless the caller opts in:
    ``normalize`` rescales them to sum 1, ``allow_unnormalized`` accepts any sum,
    ``allow_negative`` accepts negative (extrapolating) coefficients.
    """
    if not refs:
        raise ScheduleError("no checkpoints selected")
    params = _renamed(params)
    accepted = schedule_params(name)
    unknown = sorted(k for k, v in params.items() if v is not None and k not in accepted)
    if unknown:
        raise ScheduleError(f"schedule {name!r} does not take {unknown}; it takes {accepted or 'no parameters'}")
    coeffs = get_schedule(name)(refs, **{k: v for k, v in params.items() if v is not None and k in accepted})
    if is_signed(name):  # least-squares coefficients: any sign, a sum near 1 unless rescaled
        allow_negative, allow_unnormalized = True, not normalize
    return check_coeffs(coeffs, normalize=normalize, allow_unnormalized=allow_unnormalized,
                        allow_negative=allow_negative)


def _renamed(params: dict) -> dict:
    """Old keyword names (``half_life_steps``) under their new names, each with a DeprecationWarning."""
    out = dict(params)
    for old, new in RENAMED_PARAMS.items():
        if out.get(old) is None:
            out.pop(old, None)
            continue
        if out.get(new) is not None:
            raise ScheduleError(f"give {new}, not both {new} and its old name {old}")
        warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def check_coeffs(coeffs: Sequence[float], *, normalize: bool = False, allow_unnormalized: bool = False,
                 allow_negative: bool = False) -> list[float]:
    """Validate (and optionally rescale) coefficients against the sum-to-1, non-negative policy."""
    coeffs = [float(c) for c in coeffs]
    if any(not math.isfinite(c) for c in coeffs):
        raise ScheduleError(f"coefficients must be finite, got {coeffs}")
    if any(c < 0 for c in coeffs) and not allow_negative:
        raise ScheduleError(f"negative coefficients {coeffs} extrapolate beyond the checkpoints; "
                            f"pass --allow-negative to allow it")
    total = sum(coeffs)
    if normalize:
        if abs(total) < 1e-12:
            raise ScheduleError(f"cannot normalize coefficients that sum to {total}")
        return [c / total for c in coeffs]
    if abs(total - 1.0) > SUM_TOLERANCE and not allow_unnormalized:
        raise ScheduleError(f"coefficients sum to {total:.8g}, not 1: {coeffs}. Pass --normalize to rescale "
                            f"them, or --allow-unnormalized to merge with this sum on purpose")
    return coeffs
