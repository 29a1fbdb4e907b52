"""One language for "a merge method with parameters": ``NAME[:key=value[,key=value...]]``.

    sma:n=5    ema:alpha=0.2    ema:half_life=2000    minus_sqrt:n=8    custom:weights=0.2/0.3/0.5
    ema:half_life_fraction=0.05    minus_sqrt:n=8,reverse=1    phema:sigma_rel=0.07

NAME is a registered schedule (``merging/schedules.py``); the keys are that schedule's own keyword
arguments (from its signature; lists written with ``/``), plus ``n`` (window size: the last n
checkpoints) and ``every`` (their spacing in steps). ``parse_method`` is the one parser, used by
sweep, watch and search; ``split_spec`` is the tokenizer it shares with ``train --average``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ckptmerge.errors import ConfigError, ScheduleError
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.schedules import SCHEDULES, compute_coeffs, get_schedule

WINDOW_KEYS = ("n", "every")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: schedule ``name``, its keyword arguments, and an optional window (``n``, ``every``)."""

    name: str
    params: dict = field(default_factory=dict, hash=False)
    n: int | None = None
    every: int | None = None

    def __str__(self) -> str:
        items = [*self.params.items(), *((k, getattr(self, k)) for k in WINDOW_KEYS)]
        text = ",".join(f"{k}={_format(v)}" for k, v in items if v is not None)
        return f"{self.name}:{text}" if text else self.name

    def coeffs(self, refs) -> list[float]:
        """The schedule's coefficients over ``refs`` (oldest first), checked to sum to one."""
        return compute_coeffs(self.name, refs, **self.params)


def split_spec(text: str, what: str = "method") -> tuple[str, dict[str, str]]:
    """``"kind:key=value,..."`` -> ``("kind", {"key": "value", ...})``; keys and values are left to the caller."""
    name, _, rest = text.strip().partition(":")
    raw: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"{what} {text!r}: {item!r} is not key=value; write e.g. ema:alpha=0.2")
        if key.strip() in raw:
            raise ConfigError(f"{what} {text!r}: {key.strip()} given twice")
        raw[key.strip()] = value.strip()
    return name.strip(), raw


def parse_method(text: str) -> MethodSpec:
    """Parse ``NAME[:key=value,...]`` into a ``MethodSpec``; any mistake is one ConfigError line."""
    text = _legacy_ema(text)
    name, raw = split_spec(text)
    canonical = name.replace("-", "_")
    if name.replace("_", "-") not in SCHEDULES:
        raise ConfigError(f"method {text!r}: unknown method {name!r}; choose one of: {', '.join(method_names())}")
    kinds = _param_kinds(canonical)
    params, window = {}, {}
    for key, value in raw.items():
        if key not in kinds and key not in WINDOW_KEYS:
            keys = ", ".join([*kinds, *WINDOW_KEYS])
            raise ConfigError(f"method {text!r}: {canonical} takes {keys}, not {key!r}")
        if key in WINDOW_KEYS:
            window[key] = _positive_int(text, key, value)
        else:
            params[key] = _convert(text, key, value, kinds[key])
    spec = MethodSpec(canonical, params, **window)
    _dry_run(text, spec)
    return spec


def method_names() -> list[str]:
    return [key.replace("-", "_") for key in SCHEDULES]


def _legacy_ema(text: str) -> str:
    """Sweep's old ``ema:0.2`` -> ``ema:alpha=0.2``, with a deprecation notice."""
    name, _, rest = text.strip().partition(":")
    if name != "ema" or not rest or "=" in rest:
        return text
    new = f"ema:alpha={rest}"
    warnings.warn(f"method {text!r} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
    return new


def _param_kinds(name: str) -> dict[str, str]:
    """Each parameter of the schedule -> ``int``, ``float`` or ``list`` (from its annotation)."""
    signature = inspect.signature(get_schedule(name))
    kinds = {}
    for param in list(signature.parameters.values())[1:]:
        note = str(param.annotation)
        kinds[param.name] = "list" if "Sequence" in note or "list" in note else "int" if "int" in note else "float"
    return kinds


def _convert(text: str, key: str, value: str, kind: str):
    try:
        if kind == "list":
            numbers = tuple(float(v) for v in value.split("/"))
        elif kind == "int":
            numbers = (int(value),)
        else:
            numbers = (float(value),)
    except ValueError:
        example = "0.2/0.3/0.5" if kind == "list" else "an integer" if kind == "int" else "a number"
        raise ConfigError(f"method {text!r}: bad value for {key}: {value!r} (expected {example})") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"method {text!r}: {key} must be finite, got {value!r}")
    return numbers if kind == "list" else numbers[0]


def _positive_int(text: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"method {text!r}: {key} must be a positive integer, got {value!r}")
    return number


def _dry_run(text: str, spec: MethodSpec) -> None:
    """Run the schedule on stand-in checkpoints so that bad parameters fail now, not mid-sweep."""
    weights = spec.params.get("weights")
    count = len(weights) if weights else 2 if spec.name == "pair" else max(spec.n or 3, 1)
    top = 10**15  # a far newest step: any start_step the user gives lies inside the stand-in run
    refs = [CheckpointRef(Path(f"c{i}"), step=top * (i + 1) // count, tokens_seen=top * (i + 1) // count,
                          ema_gamma=(6.94, 16.97)[i % 2]) for i in range(count)]  # phema: snapshots of two profiles
    try:
        get_schedule(spec.name)(refs, **spec.params)
    except ScheduleError as exc:
        raise ConfigError(f"method {text!r}: {exc}") from None


def _format(value) -> str:
    if isinstance(value, tuple):
        return "/".join(_format(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
