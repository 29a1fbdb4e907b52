"""Validation of what a DCP folder's ``.metadata`` and ``.distcp`` chunks claim, before it is trusted.

The restricted unpickler (``io/dcp_reader.py``) only admits DCP's own classes, but their fields
can still hold anything: a list for a dtype, a negative size, a storage path that leaves the
folder, chunks that overlap or fall outside the tensor. Each check raises CheckpointFormatError
naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.confine import confined_path
from ckptmerge.io.tensor_info import TensorInfo

_FIX = "the checkpoint is corrupt or was not written by torch.distributed.checkpoint; re-save it"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_metadata(path: Path, meta: object) -> object:
    """``meta`` when it is a DCP ``Metadata`` whose tables have the right types."""
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata):
        raise CheckpointFormatError(f"{path}: holds a {type(meta).__name__}, not DCP Metadata; {_FIX}")
    table = getattr(meta, "state_dict_metadata", None)
    storage = getattr(meta, "storage_data", None)
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise CheckpointFormatError(f"{path}: state_dict_metadata is not a table of names; {_FIX}")
    if storage is not None and not isinstance(storage, dict):
        raise CheckpointFormatError(f"{path}: storage_data is a {type(storage).__name__}, not a table; {_FIX}")
    return meta


def checked_tensor_info(path: Path, fqn: str, md: object) -> TensorInfo:
    """dtype and shape of a ``TensorStorageMetadata`` entry."""
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    size = getattr(md, "size", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(size, (tuple, list)) or not all(map(_is_count, size)):
        raise CheckpointFormatError(f"{path}: tensor {fqn[:200]!r} has a malformed dtype or size; {_FIX}")
    return TensorInfo(dtype=dtype, shape=tuple(size))


def checked_storage(folder: Path, path: Path, index: object, sinfo: object, *, confine=None
                    ) -> tuple[str, tuple[int, ...] | None, Path, int, int]:
    """(fqn, chunk offsets or None, data file inside ``folder``, byte offset, byte length) of one storage entry.
    ``confine(folder, name, named_by=path)``: the data file a name stands for (default ``confined_path``)."""
    fqn = getattr(index, "fqn", None)
    offsets = getattr(index, "offset", None)
    if not isinstance(fqn, str) or not (offsets is None or isinstance(offsets, (tuple, list)) and all(map(_is_count, offsets))):
        raise CheckpointFormatError(f"{path}: a storage entry has a malformed tensor name or offset; {_FIX}")
    start, length = getattr(sinfo, "offset", None), getattr(sinfo, "length", None)
    if not _is_count(start) or not _is_count(length):
        raise CheckpointFormatError(f"{path}: storage entry of {fqn[:200]!r} has a malformed byte range; {_FIX}")
    file = (confine or confined_path)(folder, getattr(sinfo, "relative_path", None), named_by=path)
    return fqn, None if offsets is None else tuple(offsets), file, start, length


def chunk_view(file: Path, fqn: str, full: torch.Tensor, offsets: tuple[int, ...] | None, chunk: object,
               placed: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """The region of ``full`` that ``chunk`` fills; checks type, dtype, bounds and overlap with ``placed``."""
    where = f"{file}: chunk of tensor {fqn[:200]!r}"
    if not isinstance(chunk, torch.Tensor) or chunk.dtype != full.dtype or chunk.dim() != full.dim():
        kind = f"{chunk.dtype} {tuple(chunk.shape)}" if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise CheckpointFormatError(f"{where} is {kind}, expected a {full.dtype} tensor of {full.dim()} dims; {_FIX}")
    offsets = offsets if offsets is not None else (0,) * full.dim()
    sizes = tuple(chunk.shape)
    if len(offsets) != full.dim() or any(o + s > d for o, s, d in zip(offsets, sizes, full.shape)):
        raise CheckpointFormatError(f"{where} at offsets {list(offsets)} size {list(sizes)} lies outside "
                                    f"the tensor's shape {list(full.shape)}; {_FIX}")
    for other_offsets, other_sizes in placed if chunk.numel() else ():  # an empty chunk covers nothing
        if all(o < oo + os and oo < o + s for o, s, oo, os in zip(offsets, sizes, other_offsets, other_sizes)):
            raise CheckpointFormatError(f"{where} overlaps another chunk at offsets {list(other_offsets)}; {_FIX}")
    if chunk.numel():
        placed.append((offsets, sizes))
    view = full
    for dim, (begin, length) in enumerate(zip(offsets, sizes)):
        view = view.narrow(dim, begin, length)
    return view
