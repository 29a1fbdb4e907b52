"""MergeRecipe: every option of ``ckptmerge merge``, from flags or a YAML file, validated all at once.

YAML keys are the flag names in snake_case (``--every-tokens`` -> ``every_tokens``); unknown
keys are rejected and every problem is reported in one ConfigError. Example ``recipe.yaml``::

    inputs: [runs/demo]
    output: out/pma-sma
    schedule: sma
    last: 10
    every: 200
    out_dtype: bfloat16

The options of accumulation and output (``out_dtype`` ... ``as_checkpoint``) are the fields of
``MergeOptions`` (merging/options.py), under the same names; ``MergeRecipe.options()`` builds that value.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ckptmerge.errors import ConfigError
from ckptmerge.io.remote import as_location, filesystem, is_url, remote_errors
from ckptmerge.io.yaml_config import dataclass_from_dict, read_yaml
from ckptmerge.merging.method_spec import parse_method, split_spec
from ckptmerge.merging.options import MergeOptions, name_problems

DEFAULT_SCHEDULE = "sma"

# Keys of earlier releases -> their names now (accepted with a deprecation notice).
RENAMED_KEYS = {"dtype": "out_dtype", "unnormalized": "allow_unnormalized", "extrapolate": "allow_negative"}


@dataclass
class MergeRecipe:
    """One merge: inputs, window selection, schedule and parameters, output policy."""

    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    schedule: str | None = None  # the method language; None: sma (``with_method`` fills it in)
    # window
    last: int | None = None
    every: int | None = None
    every_tokens: int | None = None
    end_step: int | None = None
    steps: list[int] | None = None
    step_range: list[int] | None = None
    tokens_per_step: int | None = None
    skip_unparsable: bool = False
    fp32_masters: bool = False  # DeepSpeed ZeRO: merge the fp32 masters of the optimizer files, not the module
    # schedule parameters
    alpha: float | None = None
    half_life: float | None = None
    half_life_tokens: float | None = None
    lam: float | None = None
    weights: list[float] | None = None
    start_step: int | None = None
    start_fraction: float | None = None
    half_life_fraction: float | None = None
    sigma_rel: float | None = None
    gamma: float | None = None
    reverse: int | None = None
    scramble: int | None = None
    normalize: bool = False
    allow_unnormalized: bool = False
    allow_negative: bool = False
    # output (MergeOptions)
    out_dtype: str | None = None
    accum_dtype: str = "float32"
    device: str = "cpu"
    max_shard_size: str = "5GB"
    chunk_size: str = "16MB"
    direct_io: bool = False
    allow_nonfinite: bool = False
    hash: str = "sampled"
    force: bool = False
    dry_run: bool = False
    as_checkpoint: bool = False

    def schedule_params(self) -> dict[str, object]:
        """Parameters in the names ``ckptmerge.merging.schedules`` uses."""
        return {"alpha": self.alpha, "half_life": self.half_life, "half_life_tokens": self.half_life_tokens,
                "lam": self.lam, "weights": self.weights, "start_step": self.start_step,
                "start_fraction": self.start_fraction, "half_life_fraction": self.half_life_fraction,
                "sigma_rel": self.sigma_rel, "gamma": self.gamma, "reverse": self.reverse, "scramble": self.scramble}

    def options(self, *, progress: bool = True) -> MergeOptions:
        """The ``MergeOptions`` of this recipe (sizes parsed: ``"5GB"`` -> bytes)."""
        return MergeOptions(out_dtype=self.out_dtype, accum_dtype=self.accum_dtype, device=self.device,
                            chunk_bytes=parse_size(self.chunk_size), allow_nonfinite=self.allow_nonfinite,
                            allow_unnormalized=self.allow_unnormalized, allow_negative=self.allow_negative,
                            max_shard_bytes=parse_size(self.max_shard_size), direct_io=self.direct_io,
                            hash=self.hash, force=self.force, as_checkpoint=self.as_checkpoint, progress=progress)


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
    return recipe_from_dict(read_yaml(path), source=str(path))


def recipe_from_dict(data: dict, *, source: str = "recipe") -> MergeRecipe:
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data:
            warnings.warn(f"{source}: key {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=2)
            if new not in data or data[new] in (None, False):
                data[new] = data[old]
            del data[old]
    return dataclass_from_dict(MergeRecipe, data, source=source, validate=validate)


def validate(recipe: MergeRecipe) -> list[str]:
    """Cross-field checks; returns problems (empty when the recipe is consistent)."""
    problems = []
    if not recipe.inputs:
        problems.append("inputs: give a run directory or checkpoint paths")
    problems += name_problems(recipe.out_dtype, recipe.accum_dtype, recipe.hash)
    try:
        recipe = with_method(recipe)  # the checks below see the window and parameters the method names
    except ConfigError as exc:
        return problems + [str(exc)]
    windows = [k for k in ("last", "steps", "step_range") if getattr(recipe, k) is not None]
    if len(windows) > 1:
        problems.append(f"choose one window selection, not {windows}")
    if (recipe.every is not None or recipe.every_tokens is not None or recipe.end_step is not None) and recipe.last is None:
        problems.append("every / every_tokens / end_step need last (N checkpoints)")
    if recipe.step_range is not None and len(recipe.step_range) != 2:
        problems.append("step_range: give [start, stop]")
    if recipe.normalize and recipe.allow_unnormalized:
        problems.append("normalize and allow_unnormalized contradict each other")
    for key in ("max_shard_size", "chunk_size"):
        try:
            if parse_size(getattr(recipe, key)) <= 0:
                problems.append(f"{key}: must be positive")
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def with_method(recipe: MergeRecipe) -> MergeRecipe:
    """The recipe with ``schedule`` written in the method language (``ema:alpha=0.2,n=5``) spelled out:
    the schedule's name, its parameters and the window (``n`` -> ``last``, ``every``) in their own fields.
    A value given both in the method and by a flag must agree; otherwise one ConfigError names both."""
    import dataclasses

    recipe = with_input_weights(recipe)
    if recipe.schedule is None:
        recipe = dataclasses.replace(recipe, schedule=DEFAULT_SCHEDULE)
    name, raw = split_spec(recipe.schedule, "schedule")
    if not raw:
        return recipe
    flags = {k: v for k, v in {**recipe.schedule_params(), "n": recipe.last, "every": recipe.every}.items()
             if v is not None}
    extra = [f"{k}={_spec_value(v)}" for k, v in flags.items() if k not in raw]
    spec = parse_method(",".join([recipe.schedule, *extra]))
    given = {**spec.params, "n": spec.n, "every": spec.every}
    clashes = [f"{k}={raw[k]} vs --{_FLAG_OF.get(k, k).replace('_', '-')} {flags[k]}" for k in raw
               if k in flags and _spec_value(flags[k]) != _spec_value(given[k])]
    if clashes:
        raise ConfigError(f"schedule {recipe.schedule!r} and the flags disagree on {', '.join(clashes)}; "
                          f"give each value once")
    changes = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.params.items()}
    return dataclasses.replace(recipe, schedule=name, last=spec.n, every=spec.every, **changes)


_FLAG_OF = {"n": "last", "lam": "lambda"}  # method key -> the flag that sets the same value


def _spec_value(value) -> str:
    return "/".join(repr(float(v)) for v in value) if isinstance(value, (list, tuple)) else repr(value)


# ``PATH:WEIGHT`` (Megatron's weighted merge): a trailing ``:NUMBER``, e.g. ``runs/a/step-100:0.3``, ``s3://b/x:-1e-2``
_WEIGHT_SUFFIX = re.compile(r"(?P<path>.+):(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def split_input_weights(inputs: list[str]) -> tuple[list[str], list[float] | None]:
    """``["a:0.3", "b:0.7"]`` -> ``(["a", "b"], [0.3, 0.7])``; inputs without weights -> ``(inputs, None)``.

    An input carries a weight when it ends in ``:NUMBER``, the part before names an existing checkpoint, and
    the whole text does not (paths and URLs may hold ``:``: ``s3://b/x``, ``C:\\runs``, a folder named
    ``ckpt:5``). Every input has a weight or none does; mixing is one ConfigError."""
    parsed = [_input_weight(text) for text in inputs]
    weighted = [text for text, (_, weight) in zip(inputs, parsed) if weight is not None]
    if not weighted:
        return list(inputs), None
    if len(weighted) < len(inputs):
        plain = next(text for text, (_, weight) in zip(inputs, parsed) if weight is None)
        raise ConfigError(f"inputs: {weighted[0]!r} has a weight (PATH:WEIGHT) but {plain!r} has none; give every "
                          f"input a weight, or none and a --schedule")
    return [path for path, _ in parsed], [weight for _, weight in parsed]


def with_input_weights(recipe: MergeRecipe) -> MergeRecipe:
    """``merge a:0.3 b:0.7`` as ``merge a b --schedule custom:weights=0.3/0.7`` (weights in the order given); a
    schedule, ``--weights`` or a window given beside weighted inputs is one ConfigError."""
    import dataclasses

    inputs, weights = split_input_weights(recipe.inputs)
    if weights is None:
        return recipe
    given = []
    if recipe.schedule is not None:  # any schedule the user named, but a bare ``custom`` (what the weights mean)
        name, raw = split_spec(recipe.schedule, "schedule")
        given = [f"--schedule {recipe.schedule}"] if name.replace("-", "_") != "custom" or raw else []
    given += [f"--{k.replace('_', '-')}" for k in ("weights", "last", "every", "every_tokens", "end_step", "steps",
                                                   "step_range") if getattr(recipe, k) is not None]
    if given:
        raise ConfigError(f"inputs {' '.join(recipe.inputs)}: the weights (PATH:WEIGHT) already say what to merge "
                          f"and how; drop {', '.join(given)} or the :WEIGHT suffixes")
    return dataclasses.replace(recipe, inputs=inputs, schedule="custom", weights=weights)


def _input_weight(text: str) -> tuple[str, float | None]:
    match = _WEIGHT_SUFFIX.fullmatch(str(text))
    if match is None or _exists(text) or not _exists(match["path"]):
        return text, None
    return match["path"], float(match["weight"])


def _exists(text: str) -> bool:
    if not is_url(text):
        return Path(text).exists()
    url = as_location(text)
    with remote_errors(url, "look up"):
        return bool(filesystem(url).exists(str(url)))
