"""DeepSpeed ZeRO fp32 masters at a URL (ZeRO 3 checkpoints, ``merge --fp32-masters`` at any stage), read by byte
ranges: ``io/deepspeed_zero.py``'s ``ZeroMastersReader`` with its three reading hooks answered by range requests.

    reader = RemoteZeroMastersReader(tag, model_states, display_path=url)   # tag: a RemotePath of global_stepN/
    reader.expect([(name, start, stop), ...])    # the rows the merge will ask for, in order (optional)
    reader.get_rows("0.weight", 0, 8)            # fp32 rows, gathered from every rank's partition

Each rank's ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` and the model-states file are opened as in
``io/remote_torch.py``: the zip directory and ``data.pkl`` by range (each byte once, 128 bytes read ahead), unpickled by the
restricted unpickler with meta tensors, nothing executed. The optimizer file also holds Adam's two moments; only
the fp32 master records are read: at opening, each master record's 30-byte zip local header (one batch of
requests side by side, ``fs.cat_ranges``), then, as the engine asks for rows, exactly the bytes of those rows'
shares. Rows announced with ``expect`` are planned into requests of at most ``REQUEST_BYTES`` per file: shares
that follow each other in a rank's partition share a request (a gap of at most ``GAP_BYTES``, ZeRO 3's padding of
the last rank, is bridged), so a parameter costs no request of its own once its rank's request covers it; the
requests a row still lacks are sent together, one per rank, and a request's bytes are dropped once its last row is
handed out. No byte is requested twice. Buffers and frozen parameters (small) are read whole by range at opening.
Memory: about one request (``REQUEST_BYTES``) per rank, plus the rows handed out.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass, field

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.deepspeed_zero import ZeroMastersReader
from ckptmerge.io.remote_torch import (
    LOCAL_HEADER_BYTES,
    STATE_READ_AHEAD,
    ZIP_MAGIC,
    fetch_ranges,
    load_remote_torch_payload,
)
from ckptmerge.io.remote_safetensors import REQUEST_BYTES, RequestStats
from ckptmerge.io.remote_tree import RemoteObject
from ckptmerge.io.torch_file_rewrite import TensorRef

GAP_BYTES = 4096  # bridged between two shares of one request (ZeRO 3 pads each parameter's last share)

RowKey = tuple[str, int, int]
Slice = tuple[int, int, int, torch.dtype, str]  # (file, byte offset, bytes, dtype, storage record)


@dataclass(eq=False)
class _Request:
    """One planned request ``[offset, offset + nbytes)`` of file ``file``; ``users``: row slices still to take."""

    file: int
    record: str
    offset: int
    nbytes: int = 0
    users: int = 0
    data: bytes | None = None


@dataclass
class _Planned:
    key: RowKey
    parts: list[tuple[_Request, int, int, torch.dtype]] = field(default_factory=list)


class RemoteZeroMastersReader(ZeroMastersReader):
    """``ZeroMastersReader`` over a tag folder at a URL (a ``RemotePath``): the same names, shapes, buffers, aliases
    and values, each row read by range requests of the master records only."""

    def __init__(self, tag, model_states, *, display_path, request_bytes: int = REQUEST_BYTES):
        self._fs = tag.tree.fs
        self._tree = tag.tree
        self._objects: list[RemoteObject] = []
        self._records: list[dict] = []  # per file: storage key -> remote_torch._Record
        self._kept: list[tuple] = []  # per file: the bytes its directory's reading fetched (not asked for again)
        self._located: dict[int, tuple[int, TensorRef]] = {}  # id(meta tensor) -> (file, ref)
        self._alive: list = []  # the payloads' meta tensors, so that ids stay unique
        self._request_bytes = max(1, request_bytes)
        self.stats = RequestStats()
        self._queue: deque[_Planned] = deque()
        self._last: dict[int, _Request] = {}
        super().__init__(tag, model_states, display_path=display_path)
        self._find_data([self._located[id(p)] for pieces in self._flats for p in pieces])

    # --- the hooks of ZeroMastersReader -------------------------------------------------------------------
    def _load(self, path) -> object:
        obj = self._tree.object(path._inside())
        payload = load_remote_torch_payload(self._fs, obj, read_ahead=STATE_READ_AHEAD)  # not into the moments
        payload.file.close()  # its directory and data.pkl are read; the records are read below, by exact ranges
        index = len(self._objects)
        self._objects.append(obj)
        self._records.append(payload.file.records)
        self._kept.append(payload.file.kept)
        self._alive.append(payload.tensors)
        for tensor in payload.tensors:
            ref = payload.refs.get(id(tensor))
            if ref is not None:
                self._located[id(tensor)] = (index, ref)
        return payload.obj

    def _value(self, tensor: torch.Tensor) -> torch.Tensor:
        """A buffer's or frozen fragment's data: its header and its bytes, two small requests."""
        file, ref = self._where_tensor(tensor)
        if 0 in ref.shape:
            return torch.empty(ref.shape, dtype=ref.dtype)
        self._find_data([(file, ref)])
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        offset = self._records[file][ref.key].data_offset + ref.offset * ref.dtype.itemsize
        data = self._fetch([(file, offset, span * ref.dtype.itemsize)])[0]
        flat = torch.frombuffer(bytearray(data), dtype=ref.dtype)
        return flat.as_strided(ref.shape, ref.stride, 0).contiguous()

    def _read_span(self, key: int, start: int, length: int) -> torch.Tensor:
        return self._tensor(self._take(None, self._vector_slices(key, start, length)))

    # --- rows --------------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            return self._extras.get(name)
        shape = self._placements[self._names[name]].shape
        return self.get_rows(name, 0, shape[0] if shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (a 0-d tensor whole), fp32, in memory of their own."""
        if name not in self._names:
            return self._extras.get_rows(name, start, stop)
        shape = self._placements[self._names[name]].shape
        if shape:
            start, stop = min(max(start, 0), shape[0]), min(max(stop, start), shape[0])
        key = (name, start, stop)
        planned = self._queue.popleft() if self._queue and self._queue[0].key == key else None
        data = self._take(planned, None if planned else self._row_slices(*key))
        rows = (stop - start, *shape[1:]) if shape else ()
        return self._tensor(data).reshape(rows)

    def expect(self, keys: list[RowKey]) -> None:
        """The rows ``get_rows`` will be asked for, in order: planned into shared requests per rank's file."""
        for name, start, stop in keys:
            if name not in self._names:
                continue  # buffers and frozen parameters are in memory
            planned = _Planned((name, start, stop))
            for file, offset, nbytes, dtype, record in self._row_slices(name, start, stop):
                while nbytes:
                    request = self._extend(file, record, offset)
                    take = min(nbytes, self._request_bytes - (offset - request.offset))
                    planned.parts.append((request, offset - request.offset, take, dtype))
                    request.nbytes = offset + take - request.offset
                    request.users += 1
                    offset, nbytes = offset + take, nbytes - take
            self._queue.append(planned)

    def _extend(self, file: int, record: str, offset: int) -> _Request:
        """The file's newest planned request when ``offset`` follows it in the same record (within ``GAP_BYTES``),
        else a new one (a gap never spans a record's local header, which was fetched on its own)."""
        last = self._last.get(file)
        end = last.offset + last.nbytes if last is not None else -1
        if last is None or last.data is not None or last.record != record or not end <= offset <= end + GAP_BYTES or (
                offset - last.offset >= self._request_bytes):
            last = self._last[file] = _Request(file, record, offset)
        return last

    def _take(self, planned: _Planned | None, slices: list[Slice] | None) -> list[tuple[bytes, torch.dtype]]:
        """The bytes of a planned row (its missing requests sent together), or of ``slices`` asked now."""
        if planned is None:
            pieces = self._fetch([(f, o, n) for f, o, n, _, _ in slices])
            return [(data, s[3]) for data, s in zip(pieces, slices)]
        missing = list({id(r): r for r, _, _, _ in planned.parts if r.data is None}.values())
        for request, data in zip(missing, self._fetch([(r.file, r.offset, r.nbytes) for r in missing])):
            request.data = data
        out = []
        for request, begin, length, dtype in planned.parts:
            out.append((memoryview(request.data)[begin:begin + length], dtype))
            request.users -= 1
        for request, _, _, _ in planned.parts:
            if request.users == 0:
                request.data = b""  # handed out: its bytes can go (never sent again)
        return out

    @staticmethod
    def _tensor(parts: list[tuple[bytes, torch.dtype]]) -> torch.Tensor:
        tensors = [torch.frombuffer(bytearray(data), dtype=dtype) for data, dtype in parts if len(data)]
        if not tensors:
            return torch.empty(0, dtype=torch.float32)
        return (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).float()

    # --- where a row's bytes lie --------------------------------------------------------------------------
    def _row_slices(self, name: str, start: int, stop: int) -> list[Slice]:
        """The byte slices of rows ``[start, stop)`` of parameter ``name``: its shares on each rank, in order."""
        placement = self._placements[self._names[name]]
        row = math.prod(placement.shape[1:]) if placement.shape else 1
        first, count = start * row, (stop - start) * row
        if not placement.shape:
            first, count = 0, 1
        out, base = [], 0
        for span in placement.spans:
            lo, hi = max(first, base), min(first + count, base + span.length)
            if lo < hi:
                out += self._vector_slices(span.key, span.start + lo - base, hi - lo)
            base += span.length
        return out

    def _vector_slices(self, key: int, start: int, length: int) -> list[Slice]:
        """``read_span``'s pieces as byte slices: elements ``[start, start + length)`` of flat vector ``key``."""
        out, base = [], 0
        for piece in self._flats[key]:
            lo, hi = max(start, base), min(start + length, base + piece.numel())
            if lo < hi:
                file, ref = self._located[id(piece)]
                item = ref.dtype.itemsize
                offset = self._records[file][ref.key].data_offset + (ref.offset + lo - base) * item
                out.append((file, offset, (hi - lo) * item, ref.dtype, ref.key))
            base += piece.numel()
        return out

    def _where_tensor(self, tensor: torch.Tensor) -> tuple[int, TensorRef]:
        found = self._located.get(id(tensor))
        if found is None:
            raise CheckpointFormatError(f"{self.path}: a tensor without stored data in the DeepSpeed files; re-save "
                                        f"the checkpoint with real tensors")
        return found

    def _find_data(self, located: list[tuple[int, TensorRef]]) -> None:
        """Where each record's data starts: its local headers, fetched side by side (30 bytes each)."""
        wanted = {}
        for file, ref in located:
            if ref.shape and len(ref.shape) == 1 and ref.stride[0] != 1:
                raise CheckpointFormatError(f"{self._objects[file].url}: a strided fp32 partition; not a DeepSpeed "
                                            f"ZeRO file ckptmerge can read at a URL. Copy the run to a local folder.")
            record = self._records[file].get(ref.key)
            if record is None:
                raise CheckpointFormatError(f"{self._objects[file].url}: data.pkl names storage {ref.key!r}, which "
                                            f"the archive does not hold; the file is corrupt or truncated")
            if record.data_offset is None:
                wanted[(file, ref.key)] = record
        records = list(wanted.values())
        heads = self._fetch([(f, r.header_offset, LOCAL_HEADER_BYTES) for (f, _), r in zip(wanted, records)])
        for ((file, _), record), head in zip(wanted.items(), heads):
            if head[:4] != ZIP_MAGIC:
                raise CheckpointFormatError(f"{self._objects[file].url}: no zip local header at offset "
                                            f"{record.header_offset}; the file is corrupt or was replaced")
            name_bytes, extra_bytes = struct.unpack("<HH", head[26:30])
            record.data_offset = record.header_offset + LOCAL_HEADER_BYTES + name_bytes + extra_bytes

    def _fetch(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        """Bytes ``[offset, offset + n)`` of each ``(file, offset, n)``: one request each, sent side by side."""
        answers, requests, nbytes = fetch_ranges(self._fs, [(self._objects[f], self._kept[f], o, o + n)
                                                            for f, o, n in ranges])
        self.stats.requests += requests
        self.stats.bytes_requested += nbytes
        return answers

    def close(self) -> None:
        self._queue.clear()
        self._last.clear()
        super().close()

    def __enter__(self) -> RemoteZeroMastersReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
