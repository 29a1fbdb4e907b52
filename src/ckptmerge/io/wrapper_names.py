"""Parameter names with the wrappers that trainers put around a model taken out, and a check for leftovers.

A model's own names are what ``model.state_dict()`` gives before any wrapper: DDP and DeepSpeed add a
leading ``module.``, Lightning Fabric ``_forward_module.``, ``torch.compile`` ``_orig_mod.``, FSDP1
``_fsdp_wrapped_module.`` and activation checkpointing ``_checkpoint_wrapped_module.`` (these two, and
``_orig_mod.``, also on inner modules: ``layers.0._fsdp_wrapped_module.weight``). ``unwrap_name`` removes
them all; ``wrapped_names`` lists names that still start with a wrapper (``state_dict.``, ...), which the
merge plan refuses: a merge written under such names loads into no model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ckptmerge.errors import CheckpointFormatError

LEADING_WRAPPERS = ("module.", "_forward_module.", "_orig_mod.")
INNER_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
LEFTOVER_HEADS = frozenset({"state_dict", "model_state_dict", "module", "_forward_module",
                            "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def unwrap_name(name: str) -> str:
    """``name`` without the leading and inner wrappers listed in the module docstring."""
    while name.startswith(LEADING_WRAPPERS):
        name = next(name[len(p):] for p in LEADING_WRAPPERS if name.startswith(p))
    parts = name.split(".")
    kept = [part for part in parts if part not in INNER_WRAPPERS]
    return ".".join(kept) if kept else name


def unwrap_names(path: Path, names: Iterable[str]) -> dict[str, str]:
    """Each unwrapped name -> the stored name it stands for; refuses two names that become one."""
    out: dict[str, str] = {}
    for name in names:
        clean = unwrap_name(name)
        if clean in out:
            raise CheckpointFormatError(f"{path}: keys {name!r} and {out[clean]!r} both become {clean!r} once the "
                                        f"wrapper prefixes are removed; the checkpoint is ambiguous")
        out[clean] = name
    return out


def wrapped_names(names: Iterable[str]) -> list[str]:
    """Names that still carry a wrapper (``state_dict.``, ``_fsdp_wrapped_module.`` ...): not a model's own names."""
    return [n for n in names if n.split(".", 1)[0] in LEFTOVER_HEADS or INNER_WRAPPERS & set(n.split(".")[:-1])]
