"""MergeOptions: how one merge accumulates, writes and publishes, as one value passed whole.

Built once, from flags or a YAML recipe (``MergeRecipe.options()``) or in Python, and handed unchanged
to ``cm.merge``, the distributed merge (every rank gets the same value), the hand-back and ``watch``.
What to merge (the checkpoints and their coefficients) is the window, not an option.

    >>> opts = MergeOptions(out_dtype="bfloat16", max_shard_bytes=2 * 1000**3, force=True)
    >>> merge(refs, coeffs, "out/sma", opts)

Dtypes are names (``"float32"``, ``"bfloat16"``, ...) so that an options value is plain data: written to
``merge.json`` as is, read from YAML, and free of torch until a merge runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, fields

from ckptmerge.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ACCUM_DTYPE_NAMES = ("float32", "float64")
HASH_MODES = ("sampled", "full", "none")
DEFAULT_CHUNK_BYTES = 16 << 20  # small chunks: even shares across the engine's workers, a short start and end
DEFAULT_SHARD_BYTES = 5 * 1000**3

# Keywords of earlier releases -> the field that replaced them (accepted with a DeprecationWarning).
RENAMED = {"dtype": "out_dtype", "hash_mode": "hash"}


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge besides its window. Defaults are what ``ckptmerge merge`` does without flags."""

    # how to accumulate
    out_dtype: str | None = None       # float tensors of the output; None: the inputs' dtype
    accum_dtype: str = "float32"       # float32 or float64, whatever the checkpoints' dtype
    device: str = "cpu"                # "cpu" (every core) or an accelerator such as "cuda"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    allow_nonfinite: bool = False      # merge inputs holding NaN / Inf instead of refusing
    allow_unnormalized: bool = False   # coefficients need not sum to 1
    allow_negative: bool = False       # negative coefficients (extrapolation)
    # how to write and publish
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    direct_io: bool = False            # large output chunks past the page cache (io/output_file.py)
    hash: str = "sampled"              # input fingerprints in merge.json: sampled, full or none
    force: bool = False                # replace an existing output
    as_checkpoint: bool = False        # also write the newest input's trainer checkpoint (merging/handback.py)
    progress: bool = True              # a progress bar on the terminal

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dtype", _dtype_name(self.out_dtype))
        object.__setattr__(self, "accum_dtype", _dtype_name(self.accum_dtype))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid merge options: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = name_problems(self.out_dtype, self.accum_dtype, self.hash)
        for name in ("chunk_bytes", "max_shard_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                out.append(f"{name} must be a positive number of bytes, got {value!r}")
        return out

    def torch_dtypes(self):
        """(output dtype or None, accumulation dtype) as torch dtypes."""
        import torch

        return (getattr(torch, self.out_dtype) if self.out_dtype else None), getattr(torch, self.accum_dtype)

    def record(self) -> dict:
        """The options as ``merge.json`` records them (every field; ``progress`` is not part of the result)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}

    def changed(self) -> dict:
        """The fields set to something other than their default."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


def name_problems(out_dtype: str | None, accum_dtype: str, hash: str) -> list[str]:
    """The named options' values checked against their choices (also a YAML recipe's: merging/recipe.py)."""
    out = []
    if out_dtype is not None and out_dtype not in DTYPE_NAMES:
        out.append(f"out_dtype: {out_dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if accum_dtype not in ACCUM_DTYPE_NAMES:
        out.append(f"accum_dtype: {accum_dtype!r} is not one of {', '.join(ACCUM_DTYPE_NAMES)}")
    if hash not in HASH_MODES:
        out.append(f"hash: {hash!r} is not one of {', '.join(HASH_MODES)}")
    return out


def merge_options(options: MergeOptions | None = None, **overrides) -> MergeOptions:
    """``options`` (default: all defaults) with keyword overrides; old keyword names warn and map to new ones."""
    options = options or MergeOptions()
    if not overrides:
        return options
    known = {f.name for f in fields(MergeOptions)}
    for old, new in RENAMED.items():
        if old in overrides:
            warnings.warn(f"merge({old}=...) is deprecated; use {new}=...", DeprecationWarning, stacklevel=3)
            overrides[new] = overrides.pop(old)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown merge option(s) {', '.join(unknown)}; MergeOptions has {', '.join(sorted(known))}")
    return dataclasses.replace(options, **overrides)


def _dtype_name(dtype) -> str | None:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")
