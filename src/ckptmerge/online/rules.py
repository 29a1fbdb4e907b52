"""Online averaging rules: EMA, power EMA and SWA (running averages), PMA and LAWA (snapshot ring buffers)."""

from __future__ import annotations

import warnings
from collections import deque
from pathlib import Path

import torch

from ckptmerge.errors import ScheduleError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.memory import merge_state_dicts
from ckptmerge.merging.power_profiles import gamma_to_sigma_rel, profile_gamma
from ckptmerge.merging.schedules import anytime_decay, compute_coeffs
from ckptmerge.online.averager import Averager


class _Running(Averager):
    """A running fp32 average updated in place with ``torch._foreach_lerp_``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._avg: dict[str, torch.Tensor] = {}

    def _weight_of_new(self, step: int, tokens_seen: int | None) -> float:
        raise NotImplementedError

    def _fold(self, current, step, tokens_seen) -> None:
        if self.n_averaged == 0:
            self._avg = {k: v.to(torch.float32, copy=True) for k, v in current.items()}
            return
        names = list(self._avg)
        new = [current[k] if current[k].dtype == torch.float32 else current[k].float() for k in names]
        torch._foreach_lerp_([self._avg[k] for k in names], new, self._weight_of_new(step, tokens_seen))

    def _averaged(self) -> dict[str, torch.Tensor]:
        return dict(self._avg)

    def _extra_state(self) -> dict:
        return {"average": dict(self._avg)}

    def _load_extra_state(self, state: dict) -> None:
        self._avg = {k: v.to(torch.float32) for k, v in state["average"].items()}


class EMA(_Running):
    """Exponential moving average: avg <- decay * avg + (1 - decay) * weights, seeded with the first update.

    Give exactly one of ``decay`` (per update), ``half_life`` (steps), ``half_life_tokens`` or
    ``half_life_fraction``; with a half-life H the decay of a gap of d steps (or tokens) is 0.5^(d/H), so it is
    exact for any update spacing. ``half_life_fraction`` f is the anytime EMA (arXiv 2602.03702): the half-life is
    f times the current step, the decay of step t is 2^(-1/(f t)), and a gap s -> t decays by the product of its
    steps' decays, 2^(-(1/(s+1) + ... + 1/t)/f).
    ``warmup=True`` caps the decay at (1 + n) / (10 + n) after n updates, so early weights fade fast.
    """

    kind = "ema"

    def __init__(self, decay: float | None = None, *, half_life: float | None = None,
                 half_life_tokens: float | None = None, warmup: bool = False, every: int = 1, offload: bool = False,
                 half_life_steps: float | None = None, half_life_fraction: float | None = None):
        super().__init__(every=every, offload=offload)
        half_life = _renamed("EMA", "half_life_steps", half_life_steps, "half_life", half_life)
        if sum(x is not None for x in (decay, half_life, half_life_tokens, half_life_fraction)) != 1:
            raise ValueError("EMA needs exactly one of decay, half_life, half_life_tokens, half_life_fraction")
        if decay is not None and not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if half_life_fraction is not None and not half_life_fraction > 0:
            raise ValueError(f"EMA half_life_fraction must be positive, got {half_life_fraction}")
        self.decay, self.half_life, self.half_life_tokens, self.warmup = decay, half_life, half_life_tokens, warmup
        self.half_life_fraction = half_life_fraction

    def params(self) -> dict:
        fraction = {"half_life_fraction": self.half_life_fraction} if self.half_life_fraction is not None else {}
        return {**super().params(), "decay": self.decay, "half_life": self.half_life,
                "half_life_tokens": self.half_life_tokens, "warmup": self.warmup, **fraction}

    def current_decay(self, step: int, tokens_seen: int | None) -> float:
        if self.decay is not None:
            decay = self.decay
        elif self.half_life is not None:
            decay = 0.5 ** ((step - self.last_step) / self.half_life)
        elif self.half_life_fraction is not None:
            decay = anytime_decay(self.last_step, step, self.half_life_fraction)
        else:
            if tokens_seen is None or self.last_tokens is None:
                raise ValueError("EMA(half_life_tokens=...) needs update(model, step, tokens_seen=...)")
            decay = 0.5 ** ((tokens_seen - self.last_tokens) / self.half_life_tokens)
        return min(decay, (1 + self.n_averaged) / (10 + self.n_averaged)) if self.warmup else decay

    def _weight_of_new(self, step, tokens_seen) -> float:
        return 1.0 - self.current_decay(step, tokens_seen)


class PowerEMA(_Running):
    """Power-function EMA (EDM2, Karras et al. 2024): avg <- beta * avg + (1 - beta) * weights with
    beta = (1 - 1/t)^(gamma + 1) at step t, so the average weighs step s by s^(gamma+1) - (s-1)^(gamma+1).

    Give ``sigma_rel`` (the profile's relative width: 0.05, 0.10, ...) or ``gamma``. A gap from step s to t
    decays by (s/t)^(gamma + 1), the product of its steps' betas; the first update seeds the average.
    """

    kind = "power_ema"

    def __init__(self, sigma_rel: float | None = None, *, gamma: float | None = None, every: int = 1,
                 offload: bool = False):
        super().__init__(every=every, offload=offload)
        try:
            self.gamma = profile_gamma(sigma_rel, gamma, owner="power_ema")
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        self.sigma_rel = sigma_rel if sigma_rel is not None else gamma_to_sigma_rel(self.gamma)

    def params(self) -> dict:
        return {**super().params(), "sigma_rel": self.sigma_rel, "gamma": self.gamma}

    def _weight_of_new(self, step, tokens_seen) -> float:
        if step < 1:
            raise ValueError(f"power_ema: steps start at 1, got step {step}")
        return 1.0 - (self.last_step / step) ** (self.gamma + 1.0)


class SWA(_Running):
    """Stochastic weight averaging: the uniform mean of every update from ``start_step`` on."""

    kind = "swa"

    def __init__(self, start_step: int = 0, *, every: int = 1, offload: bool = False):
        super().__init__(every=every, offload=offload)
        self.start_step = start_step

    def params(self) -> dict:
        return {**super().params(), "start_step": self.start_step}

    def should_update(self, step: int) -> bool:
        return step >= self.start_step and super().should_update(step)

    def _weight_of_new(self, step, tokens_seen) -> float:
        return 1.0 / (self.n_averaged + 1)


class PMA(Averager):
    """A ring buffer of the last ``n`` snapshots taken every ``every`` steps, merged with an offline schedule.

    The merged weights are exactly what ``ckptmerge merge --schedule S --last n --every every`` gives for
    checkpoints saved at the same steps: the same coefficients (``ckptmerge.merging.schedules``) and the same
    merge path (``ckptmerge.merging.memory``). Until n snapshots exist, the ones present are merged.
    """

    kind = "pma"

    def __init__(self, schedule: str = "sma", n: int = 10, *, every: int = 1, offload: bool = False, **schedule_params):
        super().__init__(every=every, offload=offload)
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.schedule, self.n, self.schedule_params = schedule, n, schedule_params
        self._ring: deque[tuple[int, int | None, dict[str, torch.Tensor]]] = deque(maxlen=n)
        self._cache: dict[str, torch.Tensor] | None = None

    def params(self) -> dict:
        return {**super().params(), "schedule": self.schedule, "n": self.n, **self.schedule_params}

    def _fold(self, current, step, tokens_seen) -> None:
        self._ring.append((step, tokens_seen, {k: v.clone() for k, v in current.items()}))
        self._cache = None

    def coefficients(self) -> list[float]:
        refs = [CheckpointRef(Path(f"step-{s}"), step=s, tokens_seen=t) for s, t, _ in self._ring]
        return compute_coeffs(self.schedule, refs, **self.schedule_params)

    def _averaged(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            snapshots = [snap for _, _, snap in self._ring]
            self._cache = merge_state_dicts(snapshots, self.coefficients(), out_dtype=torch.float32,
                                            labels=[f"snapshot at step {s}" for s, _, _ in self._ring])
        return dict(self._cache)

    def _extra_state(self) -> dict:
        return {"ring": [{"step": s, "tokens": t, "tensors": dict(snap)} for s, t, snap in self._ring]}

    def _load_extra_state(self, state: dict) -> None:
        self._ring = deque(((e["step"], e["tokens"], dict(e["tensors"])) for e in state["ring"]), maxlen=self.n)
        self._cache = None


class LAWA(PMA):
    """LAWA (Sanyal et al.): the uniform average of the latest ``n`` snapshots spaced ``every`` steps apart."""

    kind = "lawa"

    def __init__(self, n: int = 5, *, every: int = 1, offload: bool = False, k: int | None = None):
        n = _renamed("LAWA", "k", k, "n", n, default=5)
        super().__init__("sma", n, every=every, offload=offload)

    def params(self) -> dict:
        return {"every": self.every, "n": self.n}


def _renamed(owner: str, old: str, old_value, new: str, new_value, default=None):
    """The value of a keyword given under its old name (with a DeprecationWarning) or its new one."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise ValueError(f"{owner}: give {new}, not both {new} and its old name {old}")
    warnings.warn(f"{owner}({old}=) is deprecated; use {owner}({new}=)", DeprecationWarning, stacklevel=3)
    return old_value
