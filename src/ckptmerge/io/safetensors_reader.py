"""Zero-copy safetensors reader over one file or a sharded set, backed by private read-only mmaps.

Tensors come back as views of the page cache: a row slice costs no copy and no anonymous
memory. ``file_range`` tells where a tensor's rows lie in their file, so that the merge engine can
read them itself, ahead of use and in large requests (``ckptmerge.io.read_ahead``). Files are mapped copy-on-write
(``ACCESS_COPY``), so even a caller that writes into a returned view cannot modify an input.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import torch

from ckptmerge.io.safetensors_header import read_header, torch_dtypes
from ckptmerge.io.safetensors_index import SafetensorsIndex
from ckptmerge.io.tensor_info import FileRange

SAFETENSORS_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in torch_dtypes().items()}


class SafetensorsReader(SafetensorsIndex):
    """Reads tensors from one or more safetensors files as if they were one checkpoint."""

    layout = "safetensors"

    def __init__(self, files: list[Path], display_path: Path | None = None):
        self.path = display_path or files[0]
        self.files = list(files)
        self._maps: list[mmap.mmap | None] = [None] * len(files)
        self._map_lock = threading.Lock()
        super().__init__()
        for index, file in enumerate(self.files):
            self._index_file(index, file)

    def _index_file(self, index: int, file: Path) -> None:
        header, data_start = read_header(file)
        self._add_file(index, file, header, data_start, file.stat().st_size - data_start, lambda i: self.files[i])

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        rows = entry.info.shape[0] if entry.info.shape else 1
        return self.get_rows(name, 0, rows)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0, as a zero-copy view (a 0-d tensor ignores the range)."""
        entry = self._entries[name]
        info = entry.info
        if not info.shape:
            count, offset, shape = 1, entry.begin, ()
        else:
            count = (stop - start) * (info.numel // info.shape[0] if info.shape[0] else 0)
            offset, shape = entry.begin + start * entry.row_bytes, (stop - start, *info.shape[1:])
        if count == 0:
            return torch.empty(shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map(entry.file_index), dtype=info.dtype, count=count, offset=offset)
        return flat.view(shape)

    def file_range(self, name: str, start: int, stop: int) -> FileRange:
        """The bytes of rows ``[start, stop)`` of ``name`` in its file (a 0-d tensor ignores the range)."""
        entry = self._entries[name]
        if not entry.info.shape:
            return FileRange(self.files[entry.file_index], entry.begin, entry.info.nbytes)
        return FileRange(self.files[entry.file_index], entry.begin + start * entry.row_bytes,
                         (stop - start) * entry.row_bytes)

    def _map(self, index: int) -> mmap.mmap:
        with self._map_lock:  # the merge's page-ahead thread and the main thread both ask
            if self._maps[index] is None:
                with open(self.files[index], "rb") as f:
                    self._maps[index] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._maps[index]

    def close(self) -> None:
        for i, mm in enumerate(self._maps):
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # views still alive; the map is released when they are collected
                self._maps[i] = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
