"""The flags of ``MergeOptions`` (merging/options.py), one spelling for every command that writes a merge.

``merge`` adds them all; ``watch`` adds those it honours. Each flag's destination is the option's own
name (sizes as text, parsed by ``parse_size``), and flags left out default to None so that a YAML recipe
or the option's own default applies.
"""

from __future__ import annotations

import argparse

from ckptmerge.cli.deprecated import add_renamed
from ckptmerge.merging.options import ACCUM_DTYPE_NAMES, DTYPE_NAMES, HASH_MODES  # torch-free

_FLAGS = {
    "out_dtype": (("--out-dtype",), dict(choices=DTYPE_NAMES, help="output dtype of float tensors "
                                                                   "(default: the inputs')")),
    "accum_dtype": (("--accum-dtype",), dict(choices=ACCUM_DTYPE_NAMES,
                                             help="accumulation dtype (default float32)")),
    "device": (("--device",), dict(help="accumulate on cpu (default, every core) or an accelerator, e.g. cuda")),
    "max_shard_size": (("--max-shard-size",), dict(help="shard size cap, e.g. 5GB (default)")),
    "chunk_size": (("--chunk-size",), dict(help="merge tensors larger than this in row slices (default 16MB)")),
    "direct_io": (("--direct-io",), dict(action="store_true", default=None, help=(
        "write the output's large chunks past the page cache (O_DIRECT, where the filesystem allows): nothing is "
        "evicted for it; faster only where filling the page cache is slow (docs/benchmarks.md)"))),
    "allow_nonfinite": (("--allow-nonfinite",), dict(action="store_true", default=None,
                                                     help="merge inputs with NaN/Inf")),
    "hash": (("--hash",), dict(choices=HASH_MODES, help="input fingerprint for merge.json")),
    "force": (("--force",), dict(action="store_true", default=None, help="replace an existing output")),
    "as_checkpoint": (("--as-checkpoint",), dict(action="store_true", default=None, help=(
        "also write the merge as the newest input's trainer checkpoint (its optimizer, scheduler and loop state "
        "beside the merged weights) so the trainer resumes from it; see docs/trainers.md"))),
}
OPTION_FIELDS = {"max_shard_size": "max_shard_bytes", "chunk_size": "chunk_bytes"}  # flag dest -> MergeOptions field


def add_output_flags(group, names=tuple(_FLAGS), *, old_spellings: bool = True) -> None:
    """Add the MergeOptions flags ``names`` (flag destinations) to an argparse group or parser; with
    ``old_spellings``, merge's earlier ``--dtype`` for ``--out-dtype`` too (watch's --dtype is the eval's)."""
    for name in names:
        flags, kwargs = _FLAGS[name]
        group.add_argument(*flags, dest=name, **kwargs)
    if "out_dtype" in names and old_spellings:
        add_renamed(group, "--dtype", "--out-dtype")


def options_from_args(args: argparse.Namespace, names, *, progress: bool = True):
    """``MergeOptions`` from the flags ``names`` that were given (the rest at their defaults)."""
    from ckptmerge.errors import ConfigError
    from ckptmerge.merging.options import MergeOptions
    from ckptmerge.merging.recipe import parse_size

    given = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            try:
                given[OPTION_FIELDS.get(name, name)] = parse_size(value) if name in OPTION_FIELDS else value
            except ValueError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    return MergeOptions(**given, progress=progress)
