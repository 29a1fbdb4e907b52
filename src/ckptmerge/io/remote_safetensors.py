"""safetensors in an object store, read by byte ranges: the header first, then tensor rows, never a local copy.

    reader = RemoteSafetensorsReader(fs, [RemoteObject(...)], display_path=url, concurrency=8)
    reader.expect([(name, start, stop), ...])   # the rows the merge will ask for, in order (optional)
    reader.get_rows(name, 0, 128)               # a tensor of those rows, fetched by range requests

Each header is fetched with one request (a second only when it is longer than the first guess) and validated
as strictly as a local one (``io/safetensors_header.py``). Rows are fetched in parts of at most ``PART_BYTES``
on a pool of ``concurrency`` threads, so several requests are in flight; rows announced with ``expect`` are
fetched ahead, up to ``concurrency`` parts beyond the ones being read, so the latency of one checkpoint's
requests hides behind the others'. Every byte the merge uses is requested once. ``file_range`` is None: the
engine reads these inputs through ``get_rows`` (its generic, non-mapped path).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_tree import RemoteObject
from ckptmerge.io.safetensors_header import header_length, parse_header
from ckptmerge.io.safetensors_index import SafetensorsIndex

HEAD_GUESS_BYTES = 64 * 1024
PART_BYTES = 8 << 20

RowKey = tuple[str, int, int]


@dataclass
class RequestStats:
    """What was asked of the store: range requests and the bytes they covered (headers included)."""

    requests: int = 0
    bytes_requested: int = 0


class RemoteSafetensorsReader(SafetensorsIndex):
    """One safetensors checkpoint (one object or a sharded set) read by range requests."""

    layout = "safetensors"

    def __init__(self, fs, files: list[RemoteObject], display_path: Url, concurrency: int = 8):
        self.path, self.files, self._fs = display_path, list(files), fs
        self._concurrency = max(1, concurrency)
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="ckptmerge-range")
        self.stats, self._stats_lock = RequestStats(), threading.Lock()
        SafetensorsIndex.__init__(self)
        self._expected: deque[RowKey] = deque()
        self._ahead: dict[RowKey, list[Future]] = {}
        self._heads: list[bytes] = []
        for index, obj in enumerate(self.files):
            self._index_file(index, obj)

    def _index_file(self, index: int, obj: RemoteObject) -> None:
        head = self._range(obj, 0, min(obj.size, HEAD_GUESS_BYTES))
        length = header_length(obj.url, head, obj.size)
        if 8 + length > len(head):
            head += self._range(obj, len(head), 8 + length - len(head))
        self._heads.append(head)  # tensors that lie in it (small files) are served from it, not asked for again
        header = parse_header(obj.url, head[8:8 + length])
        self._add_file(index, obj.url, header, 8 + length, obj.size - 8 - length, lambda i: self.files[i].url)

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None  # not a local file: the engine asks get_rows

    def expect(self, keys: list[RowKey]) -> None:
        """The rows ``get_rows`` will be asked for, in order: fetched ahead of the asking."""
        self._expected.extend(keys)
        self._top_up()

    def get(self, name: str) -> torch.Tensor:
        info = self._entries[name].info
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (a 0-d tensor ignores the range), in memory of their own."""
        key = (name, start, stop)
        if self._expected and self._expected[0] == key:
            self._expected.popleft()
            parts = self._ahead.pop(key, None) or self._submit(key)
            self._top_up()
        else:
            parts = self._submit(key)
        return self._tensor(key, parts)

    def _top_up(self) -> None:
        """Keep up to ``concurrency`` expected parts requested beyond those being read."""
        queued = sum(len(parts) for parts in self._ahead.values())
        for key in list(self._expected):
            if queued >= self._concurrency:
                break
            if key not in self._ahead:
                self._ahead[key] = self._submit(key)
                queued += len(self._ahead[key])

    def _submit(self, key: RowKey) -> list[Future]:
        obj, offset, nbytes = self._where(*key)
        head = self._heads[self._entries[key[0]].file_index]
        parts = []
        if offset < len(head) and nbytes:  # the bytes the header's request already brought
            parts.append(Future())
            parts[0].set_result(head[offset:offset + nbytes])
            nbytes, offset = max(0, offset + nbytes - len(head)), len(head)
        return parts + [self._pool.submit(self._range, obj, begin, min(PART_BYTES, offset + nbytes - begin))
                        for begin in range(offset, offset + nbytes, PART_BYTES)]

    def _where(self, name: str, start: int, stop: int) -> tuple[RemoteObject, int, int]:
        entry = self._entries[name]
        obj = self.files[entry.file_index]
        if not entry.info.shape:
            return obj, entry.begin, entry.info.nbytes
        return obj, entry.begin + start * entry.row_bytes, (stop - start) * entry.row_bytes

    def _tensor(self, key: RowKey, parts: list[Future]) -> torch.Tensor:
        name, start, stop = key
        info = self._entries[name].info
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        buffer, filled = bytearray(self._where(*key)[2]), 0
        for part in parts:
            data = part.result()
            buffer[filled:filled + len(data)] = data
            filled += len(data)
        if not buffer:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).view(shape)

    def _range(self, obj: RemoteObject, offset: int, nbytes: int) -> bytes:
        """Bytes ``[offset, offset + nbytes)`` of ``obj`` in one request; a short answer is an error."""
        if nbytes <= 0:
            return b""
        with remote_errors(obj.url, "read"):
            data = self._fs.cat_file(obj.url.path, start=offset, end=offset + nbytes)
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.bytes_requested += nbytes
        if len(data) != nbytes:
            raise CheckpointFormatError(f"{obj.url}: asked for {nbytes} bytes at offset {offset}, got {len(data)}; "
                                        f"the object changed or was cut short while it was read. Rerun the merge "
                                        f"once the checkpoint is no longer modified.")
        return data

    def close(self) -> None:
        for parts in self._ahead.values():
            for part in parts:
                part.cancel()
        self._ahead.clear()
        self._expected.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RemoteSafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
