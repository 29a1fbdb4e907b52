"""Write new values into chosen tensors of a torch zip checkpoint; every other byte is copied as it was.

Handing a merge back to a trainer means its own checkpoint file with the merged weights in place of
the newest ones, and everything else (optimizer, scheduler, loop state, hyperparameters, RNG) exactly
as the trainer wrote it. Unpickling that file to save it again would run its pickle (and lose what a
restricted unpickler leaves inert), so the pickle is never re-written: ``data.pkl`` is read with the
restricted unpickler only to learn where each tensor's bytes live (storage record, offset, shape,
strides), then the archive is copied record by record with those bytes replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.safe_pickle import RestrictedUnpickler


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a torch zip file lives: storage record ``data/<key>`` and its view of it."""

    key: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


def _tensor_ref(storage: _StorageRef, offset: int, size: Any, stride: Any, *rest: Any) -> TensorRef:
    dtype = rest[2] if len(rest) >= 3 and isinstance(rest[2], torch.dtype) else storage.dtype  # _rebuild_tensor_v3
    return TensorRef(storage.key, dtype, offset, tuple(size), tuple(stride))


def _parameter_ref(data: Any, *rest: Any) -> Any:
    return data


class _LocatingUnpickler(RestrictedUnpickler):
    """The restricted unpickler, with tensors rebuilt as TensorRefs instead of reading their data."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _tensor_ref
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _parameter_ref
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, new_type, args, state: func(*args)
        if module == "torch" and name.endswith("Storage"):
            return torch.serialization.StorageType(name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        _, storage_type, key, _location, _numel = pid
        dtype = getattr(storage_type, "dtype", torch.uint8)
        return _StorageRef(str(key), dtype)


def load_tensor_refs(path: Path) -> Any:
    """The object a torch zip file holds, with a TensorRef wherever it holds a tensor."""
    import io

    reader = torch._C.PyTorchFileReader(open(path, "rb"))
    if "data.pkl" not in reader.get_all_records():
        raise CheckpointFormatError(f"{path}: not a torch zip checkpoint (no data.pkl); cannot write it back")
    return _LocatingUnpickler(io.BytesIO(reader.get_record("data.pkl"))).load()


def rewrite_tensors(src: Path, dst: Path, values: Mapping[TensorRef, torch.Tensor]) -> None:
    """Copy torch zip file ``src`` to ``dst`` with each TensorRef's elements replaced by ``values[ref]``."""
    by_record: dict[str, list[tuple[TensorRef, torch.Tensor]]] = {}
    for ref, value in values.items():
        if tuple(value.shape) != ref.shape:
            raise CheckpointFormatError(f"{src}: merged tensor shape {tuple(value.shape)} != stored {ref.shape}")
        by_record.setdefault(f"data/{ref.key}", []).append((ref, value))
    reader = torch._C.PyTorchFileReader(open(src, "rb"))
    writer = torch._C.PyTorchFileWriter(str(dst))
    for name in reader.get_all_records():
        if name == "version":
            continue  # the writer adds it
        data = reader.get_record(name)
        if name in by_record:
            data = _patched(bytearray(data), by_record[name])
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def _patched(raw: bytearray, edits: list[tuple[TensorRef, torch.Tensor]]) -> bytes:
    for ref, value in edits:
        storage = torch.frombuffer(raw, dtype=ref.dtype)
        storage.as_strided(ref.shape, ref.stride, ref.offset).copy_(value.to(ref.dtype))
    return bytes(raw)


__all__ = ["TensorRef", "load_tensor_refs", "rewrite_tensors"]
