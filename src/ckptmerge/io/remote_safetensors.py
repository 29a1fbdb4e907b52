"""safetensors in an object store, read by byte ranges: the header first, then tensor rows, never a local copy.

    reader = RemoteSafetensorsReader(fs, [RemoteObject(...)], display_path=url, concurrency=8)
    reader.expect([(name, start, stop), ...])   # the rows the merge will ask for, in order (optional)
    reader.get_rows(name, 0, 128)               # a tensor of those rows, fetched by range requests

Each header is fetched with one request (a second only when it is longer than the first guess; the shards of a
sharded checkpoint side by side) and validated as strictly as a local one (``io/safetensors_header.py``). Rows announced with ``expect`` are planned into
requests of at most ``request_bytes`` (``REQUEST_BYTES``, 8 MiB): rows that follow each other in the same
object share a request, so a run of small tensors (norms, biases) costs one request, not one each; larger rows
are split. Up to ``concurrency`` planned requests are in flight or held on a pool of ``concurrency`` threads,
ahead of the merge, so the latency of one checkpoint's requests hides behind the others' and behind the
merge itself; a request's bytes are dropped once every row it serves has been handed out. Every byte the merge
uses is requested once. Rows asked out of the announced order are fetched on their own. ``file_range`` is
None: the engine reads these inputs through ``get_rows`` (its generic, non-mapped path).

Memory: at most ``concurrency * request_bytes`` of fetched-ahead bytes per checkpoint, plus the rows handed out.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_tree import RemoteObject
from ckptmerge.io.safetensors_header import header_length, parse_header
from ckptmerge.io.safetensors_index import SafetensorsIndex

HEAD_GUESS_BYTES = 64 * 1024
REQUEST_BYTES = 8 << 20
PART_BYTES = REQUEST_BYTES  # the former name

RowKey = tuple[str, int, int]


@dataclass
class RequestStats:
    """What was asked of the store: range requests and the bytes they covered (headers included)."""

    requests: int = 0
    bytes_requested: int = 0


@dataclass(eq=False)
class _Request:
    """One planned range request ``[offset, offset + nbytes)`` of file ``file``; ``users``: rows still to take from it."""

    file: int
    offset: int
    nbytes: int = 0
    users: int = 0
    future: Future | None = None


@dataclass
class _Planned:
    """An announced row key and where its bytes come from: ``(request or header bytes, start, length)`` slices."""

    key: RowKey
    slices: list[tuple[_Request | bytes, int, int]] = field(default_factory=list)


class RemoteSafetensorsReader(SafetensorsIndex):
    """One safetensors checkpoint (one object or a sharded set) read by range requests."""

    layout = "safetensors"

    def __init__(self, fs, files: list[RemoteObject], display_path: Url, concurrency: int = 8,
                 request_bytes: int | None = None):
        self.path, self.files, self._fs = display_path, list(files), fs
        self._concurrency = max(1, concurrency)
        self._request_bytes = max(1, request_bytes or REQUEST_BYTES)
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="ckptmerge-range")
        self.stats, self._stats_lock = RequestStats(), threading.Lock()
        SafetensorsIndex.__init__(self)
        self._planned: deque[_Planned] = deque()  # announced rows not yet asked for, in order
        self._to_submit: deque[_Request] = deque()  # their requests not yet sent, in order
        self._held = 0  # requests sent whose bytes some announced row still needs
        self._heads: list[bytes] = []
        heads = [self._pool.submit(self._fetch_head, obj) for obj in self.files]  # a sharded set's side by side
        try:
            for index, (obj, head) in enumerate(zip(self.files, heads)):
                self._index_file(index, obj, head.result())
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def _fetch_head(self, obj: RemoteObject) -> bytes:
        """The object's first bytes, through the end of its header (one request, a second for a long header)."""
        head = self._range(obj, 0, min(obj.size, HEAD_GUESS_BYTES))
        length = header_length(obj.url, head, obj.size)
        if 8 + length > len(head):
            head += self._range(obj, len(head), 8 + length - len(head))
        return head

    def _index_file(self, index: int, obj: RemoteObject, head: bytes) -> None:
        length = header_length(obj.url, head, obj.size)
        self._heads.append(head)  # tensors that lie in it (small files) are served from it, not asked for again
        header = parse_header(obj.url, head[8:8 + length])
        self._add_file(index, obj.url, header, 8 + length, obj.size - 8 - length, lambda i: self.files[i].url)

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None  # not a local file: the engine asks get_rows

    def expect(self, keys: list[RowKey]) -> None:
        """The rows ``get_rows`` will be asked for, in order: planned into requests and fetched ahead."""
        last = self._to_submit[-1] if self._to_submit else None
        for key in keys:
            planned = _Planned(key)
            last = self._plan(planned, last)
            self._planned.append(planned)
        self._top_up()

    def _plan(self, planned: _Planned, last: _Request | None) -> _Request | None:
        """Add ``planned``'s slices, extending ``last`` (the newest planned request) while its bytes follow on."""
        file, offset, nbytes = self._where(*planned.key)
        head = self._heads[file]
        if offset < len(head) and nbytes:  # the bytes the header's request already brought
            take = min(nbytes, len(head) - offset)
            planned.slices.append((head, offset, take))
            offset, nbytes = offset + take, nbytes - take
        while nbytes:
            if (last is None or last.future is not None or last.file != file or last.offset + last.nbytes != offset
                    or last.nbytes >= self._request_bytes):
                last = _Request(file, offset)
                self._to_submit.append(last)
            take = min(nbytes, self._request_bytes - last.nbytes)
            planned.slices.append((last, last.nbytes, take))
            last.nbytes += take
            last.users += 1
            offset, nbytes = offset + take, nbytes - take
        return last

    def get(self, name: str) -> torch.Tensor:
        info = self._entries[name].info
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (a 0-d tensor ignores the range), in memory of their own."""
        key = (name, start, stop)
        if self._planned and self._planned[0].key == key:
            planned = self._planned.popleft()
            try:
                data = self._join(planned.slices)
            finally:
                self._release(planned.slices)
        else:
            file, offset, nbytes = self._where(*key)
            data = self._fetch(file, offset, nbytes)
        return self._tensor(key, data)

    def _fetch(self, file: int, offset: int, nbytes: int) -> bytearray:
        """Bytes of a row range that was not announced (or asked out of order): requested now, on their own."""
        planned = _Planned((), [])
        head = self._heads[file]
        if offset < len(head) and nbytes:
            take = min(nbytes, len(head) - offset)
            planned.slices.append((head, offset, take))
            offset, nbytes = offset + take, nbytes - take
        for begin in range(offset, offset + nbytes, self._request_bytes):
            request = _Request(file, begin, min(self._request_bytes, offset + nbytes - begin))
            request.future = self._pool.submit(self._range, self.files[file], request.offset, request.nbytes)
            planned.slices.append((request, 0, request.nbytes))
        return self._join(planned.slices)

    def _top_up(self) -> None:
        """Send planned requests, in order, while fewer than ``concurrency`` are in flight or held."""
        while self._to_submit and self._held < self._concurrency:
            request = self._to_submit.popleft()
            request.future = self._pool.submit(self._range, self.files[request.file], request.offset, request.nbytes)
            self._held += 1

    def _release(self, slices: list[tuple[_Request | bytes, int, int]]) -> None:
        """One row's bytes were handed out: drop each request whose last row this was, and send more."""
        for source, _, _ in slices:
            if isinstance(source, _Request):
                source.users -= 1
                if source.users == 0:
                    source.future = None  # its bytes can go
                    self._held -= 1
        self._top_up()

    @staticmethod
    def _join(slices: list[tuple[_Request | bytes, int, int]]) -> bytearray:
        """The slices' bytes, one after another, in one new buffer (one copy)."""
        views = []  # a row of no bytes (a dimension of size 0) has no slices
        for source, start, length in slices:
            data = source if isinstance(source, bytes) else source.future.result()
            views.append(memoryview(data)[start:start + length])
        if len(views) == 1:
            return bytearray(views[0])
        return bytearray().join(views)  # no zero-fill first

    def _where(self, name: str, start: int, stop: int) -> tuple[int, int, int]:
        """``(file index, offset, bytes)`` of rows ``[start, stop)`` of ``name``."""
        entry = self._entries[name]
        if not entry.info.shape:
            return entry.file_index, entry.begin, entry.info.nbytes
        return entry.file_index, entry.begin + start * entry.row_bytes, (stop - start) * entry.row_bytes

    def _tensor(self, key: RowKey, buffer: bytearray) -> torch.Tensor:
        name, start, stop = key
        info = self._entries[name].info
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
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
        for request in self._to_submit:
            request.users = 0
        self._to_submit.clear()
        self._planned.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RemoteSafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
