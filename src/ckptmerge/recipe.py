"""MergeRecipe: every option of ``ckptmerge merge``, from flags or a YAML file, validated all at once.

YAML keys are the flag names in snake_case (``--every-tokens`` -> ``every_tokens``); unknown
keys are rejected and every problem is reported in one ConfigError. Example ``recipe.yaml``::

    inputs: [runs/demo]
    output: out/pma-sma
    schedule: sma
    last: 10
    every: 200
    dtype: bfloat16
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ckptmerge.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class MergeRecipe:
    """One merge: inputs, window selection, schedule and parameters, output policy."""

    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    schedule: str = "sma"
    # window
    last: int | None = None
    every: int | None = None
    every_tokens: int | None = None
    end_step: int | None = None
    steps: list[int] | None = None
    step_range: list[int] | None = None
    tokens_per_step: int | None = None
    skip_unparsable: bool = False
    # schedule parameters
    alpha: float | None = None
    half_life: float | None = None
    half_life_tokens: float | None = None
    lam: float | None = None
    weights: list[float] | None = None
    start_step: int | None = None
    start_fraction: float | None = None
    normalize: bool = False
    unnormalized: bool = False
    extrapolate: bool = False
    # output
    dtype: str | None = None
    accum_dtype: str = "float32"
    max_shard_size: str = "5GB"
    chunk_size: str = "256MB"
    allow_nonfinite: bool = False
    hash: str = "sampled"
    force: bool = False
    dry_run: bool = False

    def schedule_params(self) -> dict[str, object]:
        """Parameters in the names ``ckptmerge.schedules`` uses."""
        return {"alpha": self.alpha, "half_life_steps": self.half_life, "half_life_tokens": self.half_life_tokens,
                "lam": self.lam, "weights": self.weights, "start_step": self.start_step,
                "start_fraction": self.start_fraction}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"256MiB"`` -> 268_435_456, ints pass through."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def recipe_from_yaml(path: str | Path) -> MergeRecipe:
    """Load a recipe file; raise ConfigError listing every unknown key and bad value."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read recipe: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of option: value, got {type(data).__name__}")
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict, *, source: str = "recipe") -> MergeRecipe:
    known = {f.name: f for f in fields(MergeRecipe)}
    hints = typing.get_type_hints(MergeRecipe)
    problems = [f"unknown key {k!r}" for k in data if k not in known]
    values = {}
    for key, value in data.items():
        if key in known:
            problem = _type_problem(value, hints[key])
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                values[key] = value
    recipe = MergeRecipe(**values)
    problems += validate(recipe)
    if problems:
        raise ConfigError(f"{source}: invalid recipe:\n  " + "\n  ".join(problems) +
                          f"\nValid keys: {', '.join(known)}")
    return recipe


def validate(recipe: MergeRecipe) -> list[str]:
    """Cross-field checks; returns problems (empty when the recipe is consistent)."""
    problems = []
    if not recipe.inputs:
        problems.append("inputs: give a run directory or checkpoint paths")
    if recipe.dtype is not None and recipe.dtype not in DTYPE_NAMES:
        problems.append(f"dtype: {recipe.dtype!r} is not one of {DTYPE_NAMES}")
    if recipe.accum_dtype not in ("float32", "float64"):
        problems.append(f"accum_dtype: {recipe.accum_dtype!r} is not float32 or float64")
    windows = [k for k in ("last", "steps", "step_range") if getattr(recipe, k) is not None]
    if len(windows) > 1:
        problems.append(f"choose one window selection, not {windows}")
    if (recipe.every is not None or recipe.every_tokens is not None or recipe.end_step is not None) and recipe.last is None:
        problems.append("every / every_tokens / end_step need last (N checkpoints)")
    if recipe.step_range is not None and len(recipe.step_range) != 2:
        problems.append("step_range: give [start, stop]")
    if recipe.normalize and recipe.unnormalized:
        problems.append("normalize and unnormalized contradict each other")
    for key in ("max_shard_size", "chunk_size"):
        try:
            if parse_size(getattr(recipe, key)) <= 0:
                problems.append(f"{key}: must be positive")
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _type_problem(value: object, hint: object) -> str | None:
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
    return f"expected {_hint_name(hint)}, got {value!r}"


def _scalar_ok(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _hint_name(hint: object) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "null")
