"""Streaming, deterministic writer of (sharded) safetensors files.

The merge plan knows every output tensor's name, dtype and shape before any data exists, so
each shard's header is written first and tensor bytes are then appended in plan order, one
chunk at a time: no shard is ever held in memory. Headers are JSON with sorted keys, so the same
tensors always give byte-identical files. Shards follow HF naming
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
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


class StreamingSafetensorsWriter:
    """Write tensors, in the declared order and in row chunks, into sharded safetensors files.

    Each shard is an ``OutputFile`` of known size (mapped, its disk reserved up front). Use it as a
    context manager so a failure part-way releases the open file; ``close`` finishes the output."""

    def __init__(self, folder: Path, entries: Sequence[tuple[str, TensorInfo]], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 shard_names: Sequence[str] | None = None):
        """``shard_names``: this writer's part of a larger output (one rank of a distributed merge): its
        files get these names and no index is written here; the caller writes one with ``write_index``."""
        if sys.byteorder != "little":
            raise RuntimeError("safetensors output requires a little-endian machine")
        self.folder = folder
        self.shards = split_into_shards(entries, max_shard_bytes) if entries or shard_names is None else []
        self._partial = shard_names is not None
        if shard_names is not None and len(shard_names) != len(self.shards):
            raise ValueError(f"{len(shard_names)} shard names for {len(self.shards)} shards")
        self.files = [folder / name for name in (shard_names if shard_names is not None else
                                                 shard_file_names(len(self.shards)))]
        self._metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(shard_index, name, info) for shard_index, shard in enumerate(self.shards) for name, info in shard]
        self._position = 0
        self._pending_bytes = 0  # bytes still owed to the tensor at the head of the queue
        self._handle = None
        self._shard_index = -1
        self.bytes_written = 0

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk of tensor ``name`` (whole tensor, or consecutive row slices)."""
        shard_index, expected, info = self._queue[self._position]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        if chunk.dtype != info.dtype:
            raise RuntimeError(f"tensor {name!r}: writer expected {info.dtype}, got {chunk.dtype}")
        if self._pending_bytes == 0:
            self._pending_bytes = info.nbytes
        self._open_shard(shard_index)
        data = chunk.contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if nbytes > self._pending_bytes:
            raise RuntimeError(f"tensor {name!r}: {nbytes} bytes written past its declared size")
        self._handle.write(data)
        self.bytes_written += nbytes
        self._pending_bytes -= nbytes
        if self._pending_bytes == 0 or info.nbytes == 0:
            self._pending_bytes = 0
            self._position += 1

    def _open_shard(self, shard_index: int) -> None:
        if shard_index == self._shard_index:
            return
        if self._handle is not None:
            self._handle.close()
        self._shard_index = shard_index
        header = _header_bytes(self.shards[shard_index], self._metadata)
        nbytes = len(header) + sum(info.nbytes for _, info in self.shards[shard_index])
        self._handle = OutputFile(self.files[shard_index], nbytes)
        self._handle.write(header)
        self.bytes_written += len(header)

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the open file (a failed merge's partial file stays for its temporary folder's cleanup)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> list[Path]:
        """Finish the files (and the index when sharded); raises if any declared tensor is missing."""
        if self._position != len(self._queue):
            raise RuntimeError(f"writer closed with {len(self._queue) - self._position} tensor(s) unwritten")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for index in range(len(self.shards)):  # shards with only empty tensors were never opened
            if not self.files[index].exists():
                self._open_shard(index)
                self._handle.close()
                self._handle = None
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
