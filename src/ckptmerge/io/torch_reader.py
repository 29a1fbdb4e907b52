"""Raw torch checkpoints (.pt/.pth/.bin/.ckpt) read through the restricted unpickler (io/safe_pickle.py).

Training checkpoints nest the model: ``{"model": {...}, "optimizer": ...}``, Lightning's
``{"state_dict": ...}``, DeepSpeed's ``{"module": ...}``. ``find_weights`` descends through the
wrapper keys ``model`` / ``state_dict`` / ``module`` / ``model_state_dict`` whenever one of them
holds a dict, so loose top-level tensors beside the model (nanoGPT's ``best_val_loss``) are never
taken for the model; wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``,
FSDP1's ``_fsdp_wrapped_module.``: io/wrapper_names.py) are stripped. A selection that holds under a
quarter of the elements of the largest tensor dict in the file is refused: the weights are elsewhere,
and merging what was found would lose them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmerge.io.safe_pickle import load_torch_file_restricted
from ckptmerge.io.state_dict_reader import StateDictReader
from ckptmerge.io.wrapper_names import unwrap_names

WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
OPTIMIZER_KEYS = ("optimizer", "optimizers", "optim", "optimizer_states", "opt", "optimizer_state_dict")
MIN_KEPT_FRACTION = 0.25


def load_torch_payload(path: Path) -> object:
    """The whole object a torch file holds, loaded without executing anything, tensors memory-mapped."""
    try:
        return load_torch_file_restricted(path)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: {str(exc).splitlines()[0]}. Nothing from it was executed. "
            f"Fix: re-save the model weights from a trusted environment with safetensors "
            f"(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or as a plain "
            f"tensor dict (torch.save(model.state_dict(), ...)).") from exc
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointFormatError(f"{path}: cannot read torch checkpoint ({exc}); is the file complete?") from exc
    except Exception as exc:  # a corrupt pickle stream can fail in many ways (KeyError, IndexError, ...)
        raise CheckpointFormatError(f"{path}: cannot read torch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"the file is corrupt or truncated") from exc


def _checked_names(path: Path, tensors: dict) -> dict:
    """Tensor names must be strings (a state dict's keys); anything else is not a model checkpoint."""
    bad = [k for k, v in tensors.items() if not isinstance(k, str) and isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: tensor names must be strings, found {type(bad[0]).__name__} key "
                                    f"{str(bad[0])[:80]!r}; save the model's state_dict() (string keys) instead")
    return tensors


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch file safely and return its model tensors (prefixes stripped)."""
    return strip_prefixes(path, find_weights(path, load_torch_payload(path)))


def find_weights(path: Path, obj: object) -> dict[str, torch.Tensor]:
    """The model's tensor dict inside a loaded torch payload (see the module docstring)."""
    root = obj
    while isinstance(obj, dict):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _has_tensors(obj):
        keys = sorted(map(str, root))[:12] if isinstance(root, dict) else type(root).__name__
        raise CheckpointFormatError(
            f"{path}: found no model tensors; top-level keys are {keys}. ckptmerge looks for a tensor dict, "
            f"possibly nested under one of {list(WRAPPER_KEYS)}.")
    weights = {k: v for k, v in _checked_names(path, obj).items() if isinstance(v, torch.Tensor)}
    check_kept_fraction(path, weights, root)
    return weights


def check_kept_fraction(path: Path, weights: dict[str, torch.Tensor], root: object) -> None:
    """Refuse when a larger tensor dict than the one chosen sits elsewhere in the file."""
    kept = sum(t.numel() for t in weights.values())
    where, largest = _largest_tensor_dict(root)
    if largest and kept < MIN_KEPT_FRACTION * largest:
        raise CheckpointFormatError(
            f"{path}: the tensors found as the model ({len(weights)} tensor(s), {kept:,} elements) are a small "
            f"fraction of the {largest:,} elements under {where!r}; refusing rather than merging the wrong entries. "
            f"Fix: save the model's state_dict on its own (torch.save(model.state_dict(), ...)).")


def _largest_tensor_dict(obj: object, where: str = "<top level>") -> tuple[str, int]:
    best = (where, 0)
    if not isinstance(obj, dict):
        return best
    here = sum(v.numel() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor))
    best = (where, here)
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, dict) and key not in OPTIMIZER_KEYS:
            found = _largest_tensor_dict(value, key if where == "<top level>" else f"{where}.{key}")
            if found[1] > best[1]:
                best = found
    return best


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def strip_prefixes(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``, ...: see
    io/wrapper_names.py) from every name; refuse two names that become one."""
    return {clean: tensors[name] for clean, name in unwrap_names(path, tensors).items()}


class TorchFileReader(StateDictReader):
    """One or more torch files (HF ``pytorch_model-0000x-of-0000n.bin`` shards) read as one checkpoint."""

    def __init__(self, files: list[Path], display_path: Path | None = None):
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            for name, t in load_torch_file(file).items():
                if name in tensors:
                    raise CheckpointFormatError(f"{file}: tensor {name!r} appears in two shards")
                tensors[name] = t
        super().__init__(tensors, display_path or files[0], layout="torch")
