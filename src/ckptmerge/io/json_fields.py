"""Typed fields of trainers' JSON metadata (``trainer_state.json``, ``ckptmerge.json``): bad types are errors.

A string step or a non-list ``log_history`` would otherwise surface as a ``TypeError`` deep in
discovery; here it is a ``DiscoveryError`` that names the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckptmerge.errors import DiscoveryError


def load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
        raise DiscoveryError(f"{path}: invalid JSON ({str(exc)[:200]}); fix or remove the file") from exc
    return data if isinstance(data, dict) else None


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_types(path: Path, data: dict, checks: dict) -> None:
    """Each present, non-null field must pass its check; else a DiscoveryError naming the field."""
    for key, ok in checks.items():
        if data.get(key) is not None and not ok(data[key]):
            raise DiscoveryError(f"{path}: field {key!r} is {str(data[key])[:80]!r} ({type(data[key]).__name__}), "
                                 f"expected a {'number' if ok is is_number else 'non-negative integer'}; "
                                 f"fix or remove the file")


def check_log_history(path: Path, history: object) -> None:
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise DiscoveryError(f"{path}: 'log_history' must be a list of objects, got {type(history).__name__}; "
                             f"fix or remove the file")
    for entry in history:
        check_types(path, entry, {"learning_rate": is_number})
