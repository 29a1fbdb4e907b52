"""``--device`` and ``--dtype``: names users type, resolved to torch objects with clear errors.

``auto`` picks the first CUDA GPU, else Apple's MPS, else the CPU. Under torchrun, ``auto`` and ``cuda`` mean
each rank's own GPU, ``cuda:LOCAL_RANK``. Merges are always accumulated in
fp32; the dtype only says what the evaluated model computes in.
"""

from __future__ import annotations

import torch

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.device_names import DEVICES, DTYPE_NAMES
from ckptmerge.parallel.world import local_device

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A usable ``torch.device`` for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return local_device()  # cuda:0, or cuda:LOCAL_RANK for each rank of a torchrun job
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("--device mps: MPS is not available in this torch build or machine; use --device cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        return _cuda(name)
    raise ConfigError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")


def _cuda(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}; "
                          "use --device cpu (or auto)")
    if name == "cuda":
        return local_device()
    index = name.split(":", 1)[1]
    if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(f"cuda:{int(index)}")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_dtype(name: str | torch.dtype | None = "float32") -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (also ``fp32``, ``bf16``, ``fp16``)."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get((name or "float32").lower(), (name or "float32").lower())
    if key not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]
