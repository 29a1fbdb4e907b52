"""Raw torch checkpoints (.pt/.pth/.bin/.ckpt) loaded with ``weights_only=True``, never unpickled freely.

Training checkpoints nest the model: ``{"model": {...}, "optimizer": ...}``, Lightning's
``{"state_dict": ...}``, DeepSpeed's ``{"module": ...}``. The reader descends through the
wrapper keys ``model`` / ``state_dict`` / ``module`` / ``model_state_dict`` until it reaches a
dict of tensors, keeps the tensors, and strips the ``module.`` (DDP) and ``_orig_mod.``
(``torch.compile``) prefixes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmerge.io.state_dict_reader import StateDictReader

WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch file safely (memory-mapped when the file allows) and return its model tensors."""
    try:
        obj = _safe_load(path)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the file needs arbitrary unpickling, which could run code "
            f"(torch.load(weights_only=True) said: {str(exc).splitlines()[0]}). Nothing from it was executed. "
            f"Fix: re-save the model weights from a trusted environment with safetensors "
            f"(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or as a plain "
            f"tensor dict (torch.save(model.state_dict(), ...)).") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointFormatError(f"{path}: cannot read torch checkpoint ({exc}); is the file complete?") from exc
    except Exception as exc:  # a corrupt pickle stream can fail in many ways (ValueError, KeyError, ...)
        raise CheckpointFormatError(f"{path}: cannot read torch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"the file is corrupt or truncated") from exc
    return _strip_prefixes(path, _checked_names(path, _unwrap(path, obj)))


def _checked_names(path: Path, tensors: dict) -> dict[str, torch.Tensor]:
    """Tensor names must be strings (a state dict's keys); anything else is not a model checkpoint."""
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise CheckpointFormatError(f"{path}: tensor names must be strings, found {type(bad[0]).__name__} key "
                                    f"{str(bad[0])[:80]!r}; save the model's state_dict() (string keys) instead")
    return tensors


def _safe_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _unwrap(path: Path, obj: object) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not _has_tensors(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointFormatError(
                f"{path}: found no model tensors; top-level keys are {sorted(map(str, obj))[:12]}. "
                f"ckptmerge looks for a tensor dict, possibly nested under one of {list(WRAPPER_KEYS)}.")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        clean = name
        while clean.startswith(STRIPPED_PREFIXES):
            clean = clean.split(".", 1)[1]
        if clean in out:
            raise CheckpointFormatError(f"{path}: keys {name!r} and another both become {clean!r} after "
                                        f"stripping {STRIPPED_PREFIXES}; the checkpoint is ambiguous")
        out[clean] = t
    return out


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
