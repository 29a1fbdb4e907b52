"""Typed dataclasses from YAML / dicts: unknown keys rejected, every problem reported at once."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import yaml

from ckptmerge.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def dataclass_from_dict(cls: type[T], data: dict, *, source: str,
                        validate: Callable[[T], list[str]] | None = None) -> T:
    """Build ``cls(**data)`` after checking keys and types; raise one ConfigError listing all problems."""
    known = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    problems = [f"unknown key {k!r}" for k in data if k not in known]
    values = {}
    for key, value in data.items():
        if key in known:
            problem = type_problem(value, hints[key])
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                values[key] = value
    obj = cls(**values)
    if validate is not None:
        problems += validate(obj)
    if problems:
        raise ConfigError(f"{source}: invalid options:\n  " + "\n  ".join(problems) + f"\nValid keys: {', '.join(known)}")
    return obj


def type_problem(value: object, hint: object) -> str | None:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            if all(_scalar_ok(v, item) for v in value):
                return None
        elif origin is None and option is not type(None) and _scalar_ok(value, option):
            return None
    return f"expected {str(hint).replace('typing.', '').replace('NoneType', 'null')}, got {value!r}"


def _scalar_ok(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
