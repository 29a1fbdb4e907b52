"""Streaming, deterministic writer of (sharded) safetensors files.

The merge plan knows every output tensor's name, dtype and shape before any data exists, so
each shard's header, and with it every tensor's place in the file, is fixed first; tensor bytes are
then written one chunk at a time, in plan order or by several threads at their offsets: no shard
is ever held in memory. Headers are JSON with sorted keys, so the same
tensors always give byte-identical files. Shards follow HF naming
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptmerge.io.output_file import OutputFile
from ckptmerge.io.safetensors_reader import SAFETENSORS_DTYPE_NAMES
from ckptmerge.io.tensor_info import TensorInfo

INDEX_NAME = "model.safetensors.index.json"


def split_into_shards(entries: Sequence[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[list[tuple[str, TensorInfo]]]:
    """Greedy split in order; a tensor larger than the cap gets a shard of its own."""
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in entries:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def _header_bytes(entries: Sequence[tuple[str, TensorInfo]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, info in entries:
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@dataclass(frozen=True)
class _Slot:
    """Where a tensor's bytes go: shard ``shard``, from byte ``offset`` of that file."""

    shard: int
    offset: int
    info: TensorInfo

    @property
    def row_bytes(self) -> int:
        rows = self.info.shape[0] if self.info.shape else 1
        return self.info.nbytes // rows if rows else 0


class StreamingSafetensorsWriter:
    """Write tensors, in row chunks, into sharded safetensors files whose layout is fixed up front.

    ``write`` appends chunks in the declared order; ``write_rows`` places a chunk at its rows' offset
    and may be called from several threads at once for disjoint chunks. Each shard is an
    ``OutputFile`` (its disk reserved first), opened at its first byte and closed
    at its last. Use the writer as a context manager so a failure part-way releases open files;
    ``close`` checks every declared byte was written and finishes the output."""

    def __init__(self, folder: Path, entries: Sequence[tuple[str, TensorInfo]], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 shard_names: Sequence[str] | None = None, direct_io: bool = False):
        """``shard_names``: this writer's part of a larger output (one rank of a distributed merge): its
        files get these names and no index is written here; the caller writes one with ``write_index``.
        ``direct_io``: large chunks bypass the page cache (``OutputFile(direct=True)``)."""
        if sys.byteorder != "little":
            raise RuntimeError("safetensors output requires a little-endian machine")
        self.folder, self._direct_io = folder, direct_io
        self.shards = split_into_shards(entries, max_shard_bytes) if entries or shard_names is None else []
        self._partial = shard_names is not None
        if shard_names is not None and len(shard_names) != len(self.shards):
            raise ValueError(f"{len(shard_names)} shard names for {len(self.shards)} shards")
        self.files = [folder / name for name in (shard_names if shard_names is not None else
                                                 shard_file_names(len(self.shards)))]
        metadata = {"format": "pt", **(metadata or {})}
        self._headers = [_header_bytes(shard, metadata) for shard in self.shards]
        self._slots: dict[str, _Slot] = {}
        for index, shard in enumerate(self.shards):
            offset = len(self._headers[index])
            for name, info in shard:
                self._slots[name] = _Slot(index, offset, info)
                offset += info.nbytes
        self._order = [name for shard in self.shards for name, _ in shard]
        self._position, self._next_row = 0, 0  # ``write``: the tensor and row it expects next
        self._owed = [len(h) + sum(i.nbytes for _, i in shard) for h, shard in zip(self._headers, self.shards)]
        self._open: dict[int, OutputFile] = {}
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk of tensor ``name`` (whole tensor, or consecutive row slices)."""
        if self._position >= len(self._order) or name != self._order[self._position]:
            expected = self._order[self._position] if self._position < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        slot = self._slots[name]
        rows = chunk.shape[0] if chunk.dim() and slot.info.shape else 1
        self.write_rows(name, self._next_row, chunk)
        self._next_row += rows
        if self._next_row * slot.row_bytes >= slot.info.nbytes:
            self._position, self._next_row = self._position + 1, 0

    def write_rows(self, name: str, start_row: int, chunk: torch.Tensor) -> None:
        """Place ``chunk``, rows ``start_row...`` of tensor ``name`` (a 0-d tensor: the whole of it)."""
        slot = self._slots.get(name)
        if slot is None:
            raise RuntimeError(f"writer has no tensor {name!r}")
        if chunk.dtype != slot.info.dtype:
            raise RuntimeError(f"tensor {name!r}: writer expected {slot.info.dtype}, got {chunk.dtype}")
        data = chunk.contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        begin = start_row * slot.row_bytes
        if begin + nbytes > slot.info.nbytes:
            raise RuntimeError(f"tensor {name!r}: {begin + nbytes} bytes written past its declared {slot.info.nbytes}")
        if nbytes == 0:  # an empty tensor (or chunk) has no bytes: its header entry is all of it
            return
        self._file(slot.shard).write_at(slot.offset + begin, data)
        self._done(slot.shard, nbytes)

    def _file(self, shard: int) -> OutputFile:
        with self._lock:
            out = self._open.get(shard)
            if out is None:
                if self._owed[shard] < len(self._headers[shard]):
                    raise RuntimeError(f"{self.files[shard]}: written again after it was finished")
                out = self._open[shard] = OutputFile(self.files[shard], self._owed[shard], direct=self._direct_io)
                out.write_at(0, self._headers[shard])
                self._owed[shard] -= len(self._headers[shard])
                self.bytes_written += len(self._headers[shard])
            return out

    def _done(self, shard: int, nbytes: int) -> None:
        """Count ``nbytes`` of ``shard`` written; close its file at the last byte."""
        with self._lock:
            self._owed[shard] -= nbytes
            self.bytes_written += nbytes
            finished = self._open.pop(shard) if self._owed[shard] == 0 else None
        if finished is not None:
            finished.close()

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        """Release open files (a failed merge's partial files stay for its temporary folder's cleanup)."""
        with self._lock:
            files, self._open = list(self._open.values()), {}
        for out in files:
            try:
                out.close()
            except OSError:
                pass  # the failure that brought us here is the one to report

    def close(self) -> list[Path]:
        """Finish the files (and the index when sharded); raises if any declared byte is missing."""
        for shard, entries in enumerate(self.shards):  # only empty tensors, none written: just the header
            if self._owed[shard] and not any(info.nbytes for _, info in entries):
                self._file(shard)
                self._done(shard, 0)
        missing = [str(self.files[i]) for i, owed in enumerate(self._owed) if owed]
        self.__exit__()
        if missing:
            raise RuntimeError(f"writer closed with bytes unwritten in {', '.join(missing)}")
        if len(self.files) > 1 and not self._partial:
            self.bytes_written += write_index(self.folder, self.shards, [f.name for f in self.files])
        return list(self.files)


def shard_file_names(count: int) -> list[str]:
    """HF names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    return ["model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(folder: Path, shards: Sequence[Sequence[tuple[str, TensorInfo]]], names: Sequence[str]) -> int:
    """Write ``model.safetensors.index.json`` for ``shards`` stored under ``names``; returns the bytes written."""
    index = {"metadata": {"total_size": sum(i.nbytes for shard in shards for _, i in shard)},
             "weight_map": {name: names[s] for s, shard in enumerate(shards) for name, _ in shard}}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (folder / INDEX_NAME).write_text(text)
    return len(text)
