"""Averager specs on the command line: ``ema:half_life=500``, ``lawa:n=5,every=200``, ``pma:schedule=wma,n=8``,
``power_ema:sigma_rel=0.07``, ``phema:sigma_rel=0.05/0.10,every=500`` (lists with ``/``, as in the method language).

The text is split by ``merging/method_spec.split_spec``, the tokenizer of the one method language; the keys
are checked here, against each averager's own keywords.
"""

from __future__ import annotations

import warnings

from ckptmerge.errors import ConfigError
from ckptmerge.merging.method_spec import split_spec

_KEYS = {
    "ema": {"decay": float, "half_life": float, "half_life_tokens": float, "half_life_fraction": float,
            "warmup": bool, "every": int},
    "power_ema": {"sigma_rel": float, "gamma": float, "every": int},
    "phema": {"sigma_rel": tuple, "gamma": tuple, "every": int},
    "swa": {"start_step": int, "every": int},
    "lawa": {"n": int, "every": int},
    "pma": {"schedule": str, "n": int, "every": int, "alpha": float},
}
_RENAMED = {("lawa", "k"): "n"}  # old key -> new key; the old one warns for a release


def _value(text: str, kind: type):
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    if kind is tuple:
        return tuple(float(v) for v in text.split("/"))
    return kind(text)


def parse_average_spec(spec: str):
    """Build an averager from ``kind:key=value,...``."""
    from ckptmerge.online.phema import PowerEMASnapshots
    from ckptmerge.online.rules import EMA, LAWA, PMA, SWA, PowerEMA

    kind, raw = split_spec(spec, what="--average")
    if kind not in _KEYS:
        raise ConfigError(f"--average {spec!r}: unknown kind {kind!r}; choose one of {', '.join(_KEYS)}")
    params = {}
    for key, value in raw.items():
        key = _new_key(spec, kind, key)
        if key not in _KEYS[kind]:
            raise ConfigError(f"--average {spec!r}: {kind} takes {', '.join(_KEYS[kind])}, not {key!r}")
        try:
            params[key] = _value(value, _KEYS[kind][key])
        except ValueError as exc:
            raise ConfigError(f"--average {spec!r}: bad value for {key}: {value!r}") from exc
    if kind == "phema":
        if "every" not in params:
            raise ConfigError(f"--average {spec!r}: phema needs every=K, the snapshot spacing in steps, "
                              f"e.g. phema:sigma_rel=0.05/0.10,every=500")
        renamed = {"sigma_rel": "sigma_rels", "gamma": "gammas"}  # EDM2's pair 0.05/0.10 when neither is given
        params = {renamed.get(k, k): v for k, v in params.items()}
        if "gammas" in params:
            params.setdefault("sigma_rels", None)
    rules = {"ema": EMA, "swa": SWA, "lawa": LAWA, "pma": PMA, "power_ema": PowerEMA, "phema": PowerEMASnapshots}
    try:
        return rules[kind](**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--average {spec!r}: {exc}") from exc


def _new_key(spec: str, kind: str, key: str) -> str:
    new = _RENAMED.get((kind, key))
    if new is None:
        return key
    warnings.warn(f"--average {spec!r}: {key}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return new
