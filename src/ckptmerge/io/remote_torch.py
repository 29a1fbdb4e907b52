"""Torch pickle checkpoints at a URL (``pytorch_model.bin``, sharded ``pytorch_model-0000x-of-0000n.bin``, single
``.pt`` / ``.bin`` files), read by byte ranges: the zip's directory and ``data.pkl`` first, each tensor's bytes when
the engine asks for them, never a local copy.

    reader = open_remote_torch(tree, [tree.object("checkpoint-100/pytorch_model.bin")], display=url)
    reader.keys(); reader.get_rows("embed.weight", 0, 128)

Each object is opened as one seekable fsspec file with a read-ahead cache of ``READ_AHEAD_BYTES`` (s3fs pins its
reads to the listed ETag with ``If-Match``; a different version seen on opening is refused). The stdlib ``zipfile``
reads the archive's directory and ``data.pkl``; ``data.pkl`` is unpickled only by the restricted unpickler of
``io/torch_file_rewrite.py`` (``load_tensor_refs``'s), with every tensor rebuilt as a *meta* tensor (dtype and
shape, no data) whose ``TensorRef`` says where its elements lie (storage record, offset, strides). The weights are
then chosen exactly as locally (``find_weights``, wrapper prefixes stripped, ``check_kept_fraction``), and a
tensor's rows are read as one byte range of its storage record (torch writes records uncompressed); reads in file
order continue the read-ahead block, so every input byte is requested about once. Memory: one tensor (or one chunk
of rows) plus the read-ahead block per file. Legacy (pre-1.6, non-zip) torch files are refused in one line.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptmerge.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_tree import RemoteObject, RemoteTree, _version
from ckptmerge.io.tensor_info import TensorInfo
from ckptmerge.io.torch_file_rewrite import TensorRef, _LocatingUnpickler, _tensor_ref

READ_AHEAD_BYTES = 256 << 10
DIRECTORY_READ_AHEAD = 4096  # a layout's look at a payload reads the zip directory and data.pkl, not the tensors
STATE_READ_AHEAD = 128  # an optimizer file's: a local header's name and padding, not the moments after data.pkl
STORED_VALUE_ELEMENTS = 16  # a payload's tensors this small can be read alone (stored_value: a step counter)
STORED_VALUE_READ_AHEAD = 4096
ZIP_MAGIC = b"PK\x03\x04"
LOCAL_HEADER_BYTES = 30
MAX_PICKLE_BYTES = 1 << 30
DIRECTORY_CACHE_BYTES = 64 << 20  # data.pkl bytes kept across opens of the same object version

WeightsOf = Callable[[Any], dict]


class _MetaTensorUnpickler(_LocatingUnpickler):
    """``load_tensor_refs``' restricted unpickler, each tensor rebuilt as a meta tensor; ``refs[id(t)]`` locates it."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self.refs: dict[int, TensorRef] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while the payload lives

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        return self._meta_tensor if found is _tensor_ref else found

    def _meta_tensor(self, *args: Any) -> torch.Tensor:
        ref = _tensor_ref(*args)
        tensor = torch.empty_strided(ref.shape, ref.stride, dtype=ref.dtype, device="meta")
        self.refs[id(tensor)] = ref
        self._alive.append(tensor)
        return tensor


_DIRECTORIES: OrderedDict[tuple[str, str], tuple[dict, bytes, tuple]] = OrderedDict()
_DIRECTORIES_LOCK = threading.Lock()


@dataclass
class _Record:
    """One storage record ``<archive>/data/<key>``: where its local header is, its size, and (once read) its data."""

    header_offset: int
    size_bytes: int
    data_offset: int | None = None
    name_bytes: int = 0  # of its name in the central directory (the local header repeats it)


def _fresh(records: dict[str, _Record]) -> dict[str, _Record]:
    """Copies of cached records, their data offsets still to be read (each open finds its own)."""
    return {key: _Record(r.header_offset, r.size_bytes, name_bytes=r.name_bytes) for key, r in records.items()}


class RemoteTorchFile:
    """One zip-format torch file at a URL: its records located, ``data.pkl`` fetched, storages read by range."""

    def __init__(self, fs, obj: RemoteObject, *, read_ahead: int = READ_AHEAD_BYTES):
        self.obj, self.url = obj, obj.url
        self._lock = threading.Lock()
        self.bytes_requested = 0
        self.kept: tuple[tuple[int, bytes], ...] = ()  # the bytes the directory's reading fetched: (start, bytes)
        with remote_errors(obj.url, "read"):
            self._file = fs.open(obj.url.path, "rb", block_size=read_ahead, cache_type="readahead")
        try:
            self._check_version()
            self._records, self._pickle = self._directory()
        except BaseException:
            self.close()
            raise

    def _directory(self) -> tuple[dict[str, _Record], bytes]:
        """The storage records and ``data.pkl``, fetched once per (URL, version): discovery's look at a payload and
        the merge's reading of it share one fetch."""
        key = (str(self.url), self.obj.version)
        with _DIRECTORIES_LOCK:
            if key in _DIRECTORIES:
                _DIRECTORIES.move_to_end(key)
                records, data, self.kept = _DIRECTORIES[key]
                return _fresh(records), data
        records, data = self._read_directory()
        with _DIRECTORIES_LOCK:
            _DIRECTORIES[key] = (records, data, self.kept)
            while sum(len(d) + sum(len(b) for _, b in k) for _, d, k in _DIRECTORIES.values()) > DIRECTORY_CACHE_BYTES \
                    and len(_DIRECTORIES) > 1:
                _DIRECTORIES.popitem(last=False)
        return _fresh(records), data

    @property
    def records(self) -> dict[str, _Record]:
        """The storage records by key (``<archive>/data/<key>``): where each local header is, and its size."""
        return self._records

    def _check_version(self) -> None:
        """The object the file opened is the version the listing saw (an ETag / generation, where there is one)."""
        details = getattr(self._file, "details", None)
        if not isinstance(details, dict) or self.obj.version.startswith("size:"):
            return
        opened = _version(details)
        if not opened.startswith("size:") and opened != self.obj.version:
            raise CheckpointFormatError(f"{self.url}: changed since it was listed ({opened} != {self.obj.version}); "
                                        f"rerun once the checkpoint is no longer being modified.")

    def _check_zip_magic(self) -> None:
        head = self._read_at(0, min(4, self.obj.size))
        if head != ZIP_MAGIC:
            raise CheckpointFormatError(
                f"{self.url}: not a zip-format torch file (a legacy torch.save format, from torch < 1.6 or "
                f"_use_new_zipfile_serialization=False, or not a torch file); ckptmerge reads legacy files only "
                f"locally. Fix: re-save it with torch.save's default zip format (torch.save(torch.load(f), f2)) or "
                f"as safetensors, or copy it to a local folder.")

    def _read_directory(self) -> tuple[dict[str, _Record], bytes]:
        """The storage records by key and the bytes of ``data.pkl`` (zipfile checks their CRC). The directory is read
        from the end of the object, so a legacy (non-zip) file costs only those bytes before it is refused."""
        with self._lock, remote_errors(self.url, "read"):
            view = _FetchedOnce(self._file, self.obj.size, ahead=self._file.blocksize)
            try:
                try:
                    archive = zipfile.ZipFile(view)
                except zipfile.BadZipFile:
                    archive = None
                if archive is not None:
                    return self._records_and_pickle(archive)
            finally:
                self.bytes_requested += view.bytes_requested
                self.kept = tuple(view.kept)
        self._check_zip_magic()
        raise CheckpointFormatError(f"{self.url}: a zip file without a readable directory; the file is corrupt or "
                                    f"truncated. Re-upload or re-save it.")

    def _records_and_pickle(self, archive: zipfile.ZipFile) -> tuple[dict[str, _Record], bytes]:
        try:
            infos = archive.infolist()
            prefix = _archive_prefix(self.url, infos)
            pickle_info = archive.getinfo(f"{prefix}/data.pkl")
            if pickle_info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointFormatError(f"{self.url}: data.pkl of {pickle_info.file_size:,} bytes is implausibly "
                                            f"large; the file is corrupt. Re-save it.")
            data = archive.read(pickle_info)
            order = archive.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in archive.NameToInfo else None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, EOFError, NotImplementedError) as exc:
            raise CheckpointFormatError(f"{self.url}: cannot read the torch zip archive ({exc}); the file is corrupt "
                                        f"or truncated. Re-upload or re-save it.") from None
        if order not in (None, b"little"):
            raise CheckpointFormatError(f"{self.url}: saved on a {order!r}-endian machine; ckptmerge reads "
                                        f"little-endian torch files at URLs. Re-save it on a little-endian machine "
                                        f"or convert it to safetensors.")
        return _storage_records(self.url, prefix, infos), data

    def unpickle(self) -> tuple[Any, dict[int, TensorRef]]:
        """``data.pkl`` through the restricted unpickler: the payload with meta tensors, and where each lives."""
        payload, refs, _ = self.unpickle_tensors()
        return payload, refs

    def unpickle_tensors(self) -> tuple[Any, dict[int, TensorRef], list[torch.Tensor]]:
        """``unpickle``, and every meta tensor it rebuilt."""
        unpickler = _MetaTensorUnpickler(io.BytesIO(self._pickle))
        try:
            payload = unpickler.load()
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{self.url}: refusing to load: {str(exc).splitlines()[0]}. Nothing from it was executed. Fix: "
                f"re-save the model weights from a trusted environment with safetensors "
                f"(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or as a plain tensor dict "
                f"(torch.save(model.state_dict(), ...)).") from None
        except Exception as exc:  # a corrupt pickle stream fails in many ways (KeyError, IndexError, ...)
            raise CheckpointFormatError(f"{self.url}: cannot read torch checkpoint ({type(exc).__name__}: "
                                        f"{str(exc)[:200]}); the file is corrupt or truncated") from None
        return payload, unpickler.refs, unpickler._alive

    def read_storage(self, key: str, begin_bytes: int, nbytes: int) -> bytes:
        """Bytes ``[begin_bytes, begin_bytes + nbytes)`` of storage record ``data/<key>``."""
        record = self._records.get(key)
        if record is None:
            raise CheckpointFormatError(f"{self.url}: data.pkl names storage {key!r}, which the archive does not "
                                        f"hold; the file is corrupt or truncated. Re-save it.")
        if begin_bytes < 0 or begin_bytes + nbytes > record.size_bytes:
            raise CheckpointFormatError(f"{self.url}: a tensor reaches bytes [{begin_bytes}, {begin_bytes + nbytes}) "
                                        f"of storage {key!r}, which holds {record.size_bytes}; the file is corrupt")
        return self._read_at(self._data_offset(record) + begin_bytes, nbytes)

    def _data_offset(self, record: _Record) -> int:
        """Where a record's data starts: after its local header (whose extra field torch pads for alignment)."""
        if record.data_offset is None:
            head = self._read_at(record.header_offset, LOCAL_HEADER_BYTES)
            if head[:4] != ZIP_MAGIC:
                raise CheckpointFormatError(f"{self.url}: no zip local header at offset {record.header_offset}; "
                                            f"the file is corrupt or was replaced. Re-upload it.")
            name_bytes, extra_bytes = struct.unpack("<HH", head[26:30])
            record.data_offset = record.header_offset + LOCAL_HEADER_BYTES + name_bytes + extra_bytes
        return record.data_offset

    def _read_at(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` at ``offset`` through the read-ahead file; a short answer is an error."""
        if nbytes <= 0:
            return b""
        head = self._kept_at(offset, nbytes)  # fetched already, with the directory
        if len(head) == nbytes:
            return head
        offset, nbytes = offset + len(head), nbytes - len(head)
        with self._lock, remote_errors(self.url, "read"):
            before = _cache_bytes(self._file)
            try:
                self._file.seek(offset)
                data = self._file.read(nbytes)
            except OSError as exc:
                if type(exc).__name__ != "FileExpired":
                    raise
                raise _changed(self.url) from None
            self.bytes_requested += _cache_bytes(self._file) - before
        if len(data) != nbytes:
            raise _changed(self.url)
        return head + data if head else data

    def _kept_at(self, offset: int, nbytes: int) -> bytes:
        """The leading bytes of ``[offset, offset + nbytes)`` that the directory's reading fetched (``kept``)."""
        for start, data in self.kept:
            if start <= offset < start + len(data):
                return data[offset - start:offset - start + nbytes]
        return b""

    def close(self) -> None:
        self._file.close()


class _FetchedOnce(io.RawIOBase):
    """A seekable view of an fsspec file for ``zipfile``'s reading of the directory and data.pkl that asks for each
    byte once: the bytes fetched are kept, and a read fetches only what is missing (its end plus ``ahead`` bytes,
    cut where kept bytes begin). The first read at the end fetches the end records whole (``END_RECORDS`` bytes:
    zip64 end record, locator, end record; central directory bytes in a file without zip64), so zipfile's backward
    steps through them cost one request, not three. The kept bytes go on serving ``RemoteTorchFile._read_at`` and
    ``fetch_ranges``."""

    END_RECORDS = 56 + 20 + 22

    def __init__(self, file: Any, size: int, ahead: int):
        super().__init__()
        self._file, self._size, self._pos, self._ahead = file, size, 0, ahead
        self.kept: list[tuple[int, bytes]] = []  # (start, bytes), sorted, never overlapping
        self.bytes_requested = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = bytearray()
        while self._pos < end:
            kept = next(((a, b) for a, b in self.kept if a <= self._pos < a + len(b)), None)
            if kept is None:
                kept = self._fetch(self._pos, end)
            a, data = kept
            take = data[self._pos - a:min(len(data), end - a)]
            out += take
            self._pos += len(take)
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _fetch(self, start: int, end: int) -> tuple[int, bytes]:
        if end == self._size and not self.kept:
            start = min(start, max(0, self._size - self.END_RECORDS))
        stop = min([self._size, end + self._ahead] + [a for a, _ in self.kept if a > start])
        data = self._file._fetch_range(start, stop)  # the fsspec file's own fetcher (s3fs: pinned by If-Match)
        if len(data) != stop - start:
            raise EOFError(f"asked for {stop - start} bytes at {start}, got {len(data)}")
        self.bytes_requested += len(data)
        self.kept = sorted(self.kept + [(start, data)])
        return start, data


def _changed(url: Url) -> CheckpointFormatError:
    return CheckpointFormatError(f"{url}: changed while it was being merged (another ETag than the one listed, or "
                                 f"cut short); nothing was published. Rerun the merge once the checkpoint is no "
                                 f"longer modified.")


def _cache_bytes(file: Any) -> int:
    return getattr(getattr(file, "cache", None), "total_requested_bytes", 0)


def _archive_prefix(url: Url, infos: list[zipfile.ZipInfo]) -> str:
    """The archive's top folder (torch names records ``<name>/data.pkl``, ``<name>/data/0``, ...)."""
    found = [i.filename[:-len("/data.pkl")] for i in infos if i.filename.endswith("/data.pkl")
             and i.filename.count("/") == 1]
    if len(found) != 1:
        raise CheckpointFormatError(f"{url}: a zip file but not a torch checkpoint (no <name>/data.pkl record); "
                                    f"save the model with torch.save(model.state_dict(), ...) or as safetensors.")
    return found[0]


def _storage_records(url: Url, prefix: str, infos: list[zipfile.ZipInfo]) -> dict[str, _Record]:
    records = {}
    for info in infos:
        if not info.filename.startswith(f"{prefix}/data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointFormatError(f"{url}: storage record {info.filename} is compressed; torch.save writes "
                                        f"them uncompressed. Re-save it with torch.save (or as safetensors).")
        records[info.filename[len(prefix) + len("/data/"):]] = _Record(info.header_offset, info.file_size,
                                                                            name_bytes=len(info.orig_filename.encode()))
    return records


@dataclass
class RemoteTorchPayload:
    """The object a torch file at a URL holds, its tensors as meta tensors (dtype and shape, no data).

    ``payload.obj`` is what ``torch.load`` would give (through the restricted unpickler: unknown classes are inert
    ``Placeholder``s); ``payload.read(t)`` fetches the data of one of its tensors (a step counter, say)."""

    obj: Any
    file: RemoteTorchFile
    refs: dict[int, TensorRef] = field(repr=False)
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False)

    def ref(self, tensor: torch.Tensor) -> TensorRef | None:
        return self.refs.get(id(tensor))

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        ref = self.ref(tensor)
        if ref is None:
            raise CheckpointFormatError(f"{self.file.url}: a tensor without stored data (a meta tensor); re-save "
                                        f"the checkpoint with real tensors")
        return read_rows(self.file, ref, 0, ref.shape[0] if ref.shape else 1)


def load_remote_torch_payload(fs, obj: RemoteObject, *, read_ahead: int = READ_AHEAD_BYTES) -> RemoteTorchPayload:
    """Open the torch zip file ``obj`` and unpickle its ``data.pkl`` safely (no tensor data is read yet)."""
    file = RemoteTorchFile(fs, obj, read_ahead=read_ahead)
    try:
        obj, refs, tensors = file.unpickle_tensors()
    except BaseException:
        file.close()
        raise
    return RemoteTorchPayload(obj, file, refs, tensors)


_PAYLOADS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_PAYLOADS_KEPT = 4
_PAYLOADS_LOCK = threading.Lock()


def remote_payload_object(fs, obj: RemoteObject, *, read_ahead: int = DIRECTORY_READ_AHEAD) -> Any:
    """``payload.obj`` of ``load_remote_torch_payload``, the file closed, kept for the last few (URL, version)s as
    ``layouts.base.payload`` keeps local ones: what a layout's ``detect`` / ``read_step`` look at. Its tensors are
    meta tensors (no data); each small one (``STORED_VALUE_ELEMENTS`` elements at most: a step counter, a loss) has
    a ``stored_value()`` that fetches its data by one range read when asked (``layouts.base.as_int`` asks for a
    step). A layout that opens weights goes through ``open_remote_torch``."""
    key = (str(obj.url), obj.version)
    with _PAYLOADS_LOCK:
        if key in _PAYLOADS:
            _PAYLOADS.move_to_end(key)
            return _PAYLOADS[key]
    payload = load_remote_torch_payload(fs, obj, read_ahead=read_ahead)  # (almost) no tensor data read ahead
    payload.file.close()
    for tensor in payload.tensors:
        ref = payload.refs.get(id(tensor))
        if ref is not None and tensor.numel() <= STORED_VALUE_ELEMENTS:
            tensor.stored_value = _StoredValue(fs, obj, ref)
    with _PAYLOADS_LOCK:
        _PAYLOADS[key] = payload.obj
        while len(_PAYLOADS) > _PAYLOADS_KEPT:
            _PAYLOADS.popitem(last=False)
    return payload.obj




class _StoredValue:
    """The data of one small tensor of a payload at a URL, read by range (one request) the first time it is asked."""

    def __init__(self, fs, obj: RemoteObject, ref: TensorRef):
        self._fs, self._obj, self._ref = fs, obj, ref
        self._value: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            # the directory is cached: one request for the record's local header and the tensor's few bytes
            file = RemoteTorchFile(self._fs, self._obj, read_ahead=STORED_VALUE_READ_AHEAD)
            try:
                self._value = read_rows(file, self._ref, 0, self._ref.shape[0] if self._ref.shape else 1)
            finally:
                file.close()
        return self._value


STORAGE_ALIGNMENT = 64  # torch.save pads each record's local header so that its data starts at a multiple of this


def fetch_stored_values(values: list) -> None:
    """Read the data of many small payload tensors at a URL (``stored_value``: a step per parameter in an optimizer
    state) side by side: one range request each, sent together (``fs.cat_ranges``), from the record's local header
    to its last byte (torch aligns the data to ``STORAGE_ALIGNMENT``); nothing around them (the moments) is asked
    for. Values not at a URL, or already read, are left alone."""
    pending = [v.stored_value for v in values if isinstance(getattr(v, "stored_value", None), _StoredValue)]
    pending = [p for p in pending if p._value is None]
    by_object: dict[tuple[str, str], list[_StoredValue]] = {}
    for p in pending:
        by_object.setdefault((str(p._obj.url), p._obj.version), []).append(p)
    for group in by_object.values():
        _fetch_group(group)


def _fetch_group(group: list[_StoredValue]) -> None:
    fs, obj = group[0]._fs, group[0]._obj
    file = RemoteTorchFile(fs, obj, read_ahead=STORED_VALUE_READ_AHEAD)  # its directory is cached: no request
    try:
        records = [file.records.get(p._ref.key) for p in group]
        if any(r is None for r in records):
            raise CheckpointFormatError(f"{obj.url}: data.pkl names a storage the archive does not hold; the file is "
                                        f"corrupt or truncated. Re-save it.")
        spans = [_value_bytes(p._ref) for p in group]
        ends = [_aligned(r.header_offset + LOCAL_HEADER_BYTES + r.name_bytes + 4) + begin + n
                for r, (begin, n) in zip(records, spans)]
        answers, _, _ = fetch_ranges(fs, [(obj, file.kept, r.header_offset, end) for r, end in zip(records, ends)])
        for p, record, (begin, nbytes), data in zip(group, records, spans, answers):
            if data[:4] != ZIP_MAGIC:
                raise _changed(obj.url)
            name_bytes, extra_bytes = struct.unpack("<HH", data[26:30])
            start = LOCAL_HEADER_BYTES + name_bytes + extra_bytes + begin
            got = data[start:start + nbytes]
            if len(got) < nbytes:  # another writer's padding: the rest of the value by one more request
                got += file._read_at(record.header_offset + start + len(got), nbytes - len(got))
            p._value = _from_bytes(got, p._ref)
    finally:
        file.close()


def fetch_ranges(fs, wanted: list[tuple[RemoteObject, tuple, int, int]]) -> tuple[list[bytes], int, int]:
    """Bytes ``[start, end)`` of each ``(object, kept, start, end)``: what ``kept`` (a ``RemoteTorchFile.kept``: the
    bytes its directory's reading fetched) holds is taken from it, the rest asked for, one request per gap, all sent
    together (``fs.cat_ranges``), so no byte is requested twice. Returns the bytes, the requests and bytes asked."""
    plans, gaps = [], []
    for obj, kept, start, end in wanted:
        pieces, pos = [], start
        for a, data in sorted(kept):
            if a + len(data) <= pos or a >= end:
                continue
            if a > pos:
                pieces.append(len(gaps))
                gaps.append((obj, pos, a))
            stop = min(end, a + len(data))
            pieces.append(data[pos - a:stop - a])
            pos = stop
        if pos < end:
            pieces.append(len(gaps))
            gaps.append((obj, pos, end))
        plans.append(pieces)
    answers = []
    if gaps:
        with remote_errors(gaps[0][0].url, "read"):
            answers = fs.cat_ranges([o.url.path for o, _, _ in gaps], [a for _, a, _ in gaps],
                                    [b for _, _, b in gaps], on_error="return")
    for (obj, a, b), data in zip(gaps, answers):
        if isinstance(data, BaseException):
            with remote_errors(obj.url, "read"):
                raise data
        if len(data) != b - a:
            raise _changed(obj.url)
    out = [b"".join(p if isinstance(p, bytes) else answers[p] for p in pieces) for pieces in plans]
    return out, len(gaps), sum(b - a for _, a, b in gaps)


def _aligned(offset: int) -> int:
    return -(-offset // STORAGE_ALIGNMENT) * STORAGE_ALIGNMENT


def _value_bytes(ref: TensorRef) -> tuple[int, int]:
    """(first byte in its storage, bytes) of a whole tensor."""
    span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    return ref.offset * ref.dtype.itemsize, span * ref.dtype.itemsize


def _from_bytes(data: bytes, ref: TensorRef) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=ref.dtype)
    return flat.as_strided(ref.shape, ref.stride, 0).contiguous()


def read_rows(file: RemoteTorchFile, ref: TensorRef, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` (dim 0, clamped as slicing clamps; a 0-d tensor whole) of the tensor at ``ref``, in
    memory of their own."""
    if ref.shape:
        start, stop = min(max(start, 0), ref.shape[0]), min(max(stop, start), ref.shape[0])
    shape = (stop - start, *ref.shape[1:]) if ref.shape else ()
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=ref.dtype)
    first = ref.offset + (start * ref.stride[0] if ref.shape else 0)
    span_elements = 1 + sum((n - 1) * s for n, s in zip(shape, ref.stride))
    item_bytes = ref.dtype.itemsize
    data = file.read_storage(ref.key, first * item_bytes, span_elements * item_bytes)
    flat = torch.frombuffer(bytearray(data), dtype=ref.dtype)
    rows = flat.as_strided(shape, ref.stride[:len(shape)], 0)
    return rows if rows.is_contiguous() else rows.contiguous()


class RemoteTorchReader:
    """A CheckpointReader over chosen tensors of torch files at URLs; each read is a byte range of its file."""

    layout = "torch"

    def __init__(self, display: Url, files: list[RemoteTorchFile], weights: dict[str, tuple[int, TensorRef]],
                 metadata: dict[str, str] | None = None, *, half_to_fp32: bool = False):
        self.path, self.files, self._metadata = display, files, metadata or {}
        self._upcast = half_to_fp32
        self._aliases = _aliases(weights)
        self._entries = {name: where for name, where in weights.items() if name not in self._aliases}

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        ref = self._entries[name][1]
        return TensorInfo(dtype=self._dtype(ref.dtype), shape=ref.shape)

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self._upcast and dtype in (torch.bfloat16, torch.float16) else dtype

    def get(self, name: str) -> torch.Tensor:
        ref = self._entries[name][1]
        return self.get_rows(name, 0, ref.shape[0] if ref.shape else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        index, ref = self._entries[name]
        rows = read_rows(self.files[index], ref, start, stop)
        return rows.to(self._dtype(rows.dtype))  # half read as fp32 (exactly), as layouts.base.half_to_fp32_copies

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None  # not a local file: the engine asks get_rows

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def bytes_requested(self) -> int:
        return sum(f.bytes_requested for f in self.files)

    def close(self) -> None:
        for file in self.files:
            file.close()

    def __enter__(self) -> RemoteTorchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aliases(weights: dict[str, tuple[int, TensorRef]]) -> dict[str, str]:
    """Tied names (the same file, storage, offset, shape, strides and dtype) -> the first such name, as
    ``state_dict_reader.find_aliases`` decides locally; empty tensors are never aliases."""
    seen: dict[tuple[int, TensorRef], str] = {}
    aliases = {}
    for name, where in weights.items():
        if 0 in where[1].shape:
            continue
        if where in seen:
            aliases[name] = seen[where]
        else:
            seen[where] = name
    return aliases


def open_remote_torch(tree: RemoteTree, objects: list[RemoteObject], display: Url, *,
                      weights_of: WeightsOf | None = None, framework: str | None = None,
                      strip_attribute: bool = False, half_to_fp32: bool = False) -> RemoteTorchReader:
    """Open torch pickle files at URLs as one checkpoint reader, reading no tensor data yet.

    Args:
        tree: the listing the objects came from (``RemoteTree.list``); its filesystem does the reads.
        objects: the zip-format torch files of the checkpoint (several for HF ``pytorch_model-0000x-of-0000n.bin``
            shards: a name in two shards is refused, as locally).
        display: the checkpoint's URL, as errors, ``inspect`` and ``merge.json`` show it.
        weights_of: which sub-dict of each file's payload holds the weights, e.g. ``lambda s: s["state_dict"]``
            for Lightning (the payload's tensors are meta tensors; use ``load_remote_torch_payload`` to look at it
            first). Default: ``torch_reader.find_weights``, the plain-file rule (descend ``model`` /
            ``state_dict`` / ``module`` / ``model_state_dict``). A given ``weights_of`` is checked with
            ``check_kept_fraction`` against the whole payload, as the local trainer layouts do.
        framework: with ``weights_of``, the reader's metadata is ``{"framework": framework, "key_prefix": ...}``
            like ``layouts.base.weights_reader``'s; without, ``{}`` like ``TorchFileReader``'s.
        strip_attribute: also remove the wrapper's attribute prefix shared by every name (Lightning's ``model.``;
            ``layouts.base.strip_attribute_prefix``).
        half_to_fp32: bf16 / fp16 tensors are read as fp32 (exactly), as ``layouts.base.half_to_fp32_copies`` gives
            them locally (DeepSpeed's model-states ``module``).

    Returns a CheckpointReader (layout ``torch``) with the local reader's names, dtypes, shapes and aliases;
    ``get`` / ``get_rows`` read each tensor's bytes by range. Raises ``UnsafeCheckpointError`` for a pickle naming
    a code-running global (nothing runs) and ``CheckpointFormatError`` for a legacy non-zip file, a corrupt
    archive or no model tensors, each one line naming the file and the fix. Close the reader when done.
    """
    files: list[RemoteTorchFile] = []
    weights: dict[str, tuple[int, TensorRef]] = {}
    prefixes = set()
    try:
        for obj in objects:
            payload = load_remote_torch_payload(tree.fs, obj)
            files.append(payload.file)
            named, prefix = _chosen_weights(payload, weights_of, strip_attribute)
            prefixes.add(prefix)
            for name, tensor in named.items():
                if name in weights:
                    raise CheckpointFormatError(f"{obj.url}: tensor {name!r} appears in two shards")
                weights[name] = (len(files) - 1, _located(payload, name, tensor))
    except BaseException:
        for file in files:
            file.close()
        raise
    metadata = {"framework": framework, "key_prefix": min(prefixes, default="")} if framework else {}
    return RemoteTorchReader(display, files, weights, metadata, half_to_fp32=half_to_fp32)


def _chosen_weights(payload: RemoteTorchPayload, weights_of: WeightsOf | None,
                    strip_attribute: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors of one file, named as the local reader names them, and the attribute prefix removed."""
    from ckptmerge.io.layouts.base import strip_attribute_prefix
    from ckptmerge.io.torch_reader import check_kept_fraction, find_weights, strip_prefixes

    url = payload.file.url
    if weights_of is None:
        _refuse_trainer_payload(url, payload.obj)
        weights = find_weights(url, payload.obj)
    else:
        weights = weights_of(payload.obj)
        check_kept_fraction(url, weights, payload.obj)
    weights = strip_prefixes(url, weights)
    return strip_attribute_prefix(weights) if strip_attribute else (weights, "")


def _located(payload: RemoteTorchPayload, name: str, tensor: Any) -> TensorRef:
    ref = payload.ref(tensor) if isinstance(tensor, torch.Tensor) else None
    if ref is None:
        raise CheckpointFormatError(f"{payload.file.url}: tensor {name!r} has no stored data (a meta or sparse "
                                    f"tensor); save the model's dense state_dict() instead")
    return ref


def _refuse_trainer_payload(url: Url, obj: Any) -> None:
    """A Lightning ``.ckpt`` is read by its layout (``open_remote_checkpoint`` and discovery match layouts first; the
    ``model.`` attribute stripped): the plain rule would name its tensors differently, so it refuses rather than
    merging under other names."""
    from ckptmerge.io.layouts.lightning import _is_lightning

    if url.name.endswith(".ckpt") and _is_lightning(obj):
        raise CheckpointFormatError(f"{url}: a PyTorch Lightning checkpoint, which the lightning layout reads (its "
                                    f"module attribute stripped), not the plain torch-file rule. Give its URL, or its "
                                    f"run's, to inspect / merge, or export the model's weights as safetensors.")
