"""Averager specs on the command line: ``ema:half_life=500``, ``lawa:k=5,every=200``, ``pma:schedule=wma,n=8``."""

from __future__ import annotations

from ckptmerge.errors import ConfigError

_KEYS = {
    "ema": {"decay": float, "half_life": float, "half_life_tokens": float, "warmup": bool, "every": int},
    "swa": {"start_step": int, "every": int},
    "lawa": {"k": int, "every": int},
    "pma": {"schedule": str, "n": int, "every": int, "alpha": float},
}


def _value(text: str, kind: type):
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def parse_average_spec(spec: str):
    """Build an averager from ``kind:key=value,...``."""
    from ckptmerge.online.rules import EMA, LAWA, PMA, SWA

    kind, _, rest = spec.partition(":")
    if kind not in _KEYS:
        raise ConfigError(f"--average {spec!r}: unknown kind {kind!r}; choose one of {', '.join(_KEYS)}")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _KEYS[kind]:
            raise ConfigError(f"--average {spec!r}: {kind} takes {', '.join(_KEYS[kind])}, not {key!r}")
        try:
            params[key] = _value(value, _KEYS[kind][key])
        except ValueError as exc:
            raise ConfigError(f"--average {spec!r}: bad value for {key}: {value!r}") from exc
    try:
        if kind == "ema":
            if "half_life" in params:
                params["half_life_steps"] = params.pop("half_life")
            return EMA(**params)
        return {"swa": SWA, "lawa": LAWA, "pma": PMA}[kind](**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--average {spec!r}: {exc}") from exc
