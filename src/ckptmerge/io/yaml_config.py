"""Typed dataclasses from YAML / dicts: unknown keys rejected, every problem reported at once."""

from __future__ import annotations

import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import yaml

from ckptmerge.errors import ConfigError

T = TypeVar("T")
MAX_YAML_NODES = 100_000  # scalars + collections after alias expansion; recipes have dozens


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = _load_bounded(path, text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc)[:500]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _load_bounded(path: Path, text: str) -> object:
    """``yaml.safe_load`` that refuses documents whose aliases expand past ``MAX_YAML_NODES``
    ("billion laughs") or refer to themselves, before the expanded value is ever built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = _expanded_nodes(path, node, {}, set())
        if nodes > MAX_YAML_NODES:
            raise ConfigError(f"{path}: YAML aliases expand to over {MAX_YAML_NODES} values; "
                              f"a recipe needs a few dozen. Write the values out without anchors (&) and aliases (*).")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_nodes(path: Path, node: yaml.Node, sizes: dict[int, int], open_ids: set[int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (memoized: linear time)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_ids:
        raise ConfigError(f"{path}: a YAML alias refers to its own anchor (a recursive value); remove the alias")
    open_ids.add(id(node))
    children = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _expanded_nodes(path, child, sizes, open_ids)
        if total > MAX_YAML_NODES:
            break
    open_ids.discard(id(node))
    sizes[id(node)] = total
    return total


def _short(value: object) -> str:
    """A bounded repr for messages: never builds the full text of a huge or shared value."""
    return reprlib.repr(value)


def dataclass_from_dict(cls: type[T], data: dict, *, source: str,
                        validate: Callable[[T], list[str]] | None = None) -> T:
    """Build ``cls(**data)`` after checking keys and types; raise one ConfigError listing all problems."""
    known = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    problems = [f"unknown key {_short(k)}" for k in data if k not in known]
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
    return f"expected {str(hint).replace('typing.', '').replace('NoneType', 'null')}, got {_short(value)}"


def _scalar_ok(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
