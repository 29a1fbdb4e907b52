"""A file written at known offsets whose final size is known before the first byte: a merge's output shard.

Its disk is reserved first (``fallocate``): a full disk or quota fails at once, before any work, not
mid-merge, and the writes that follow only fill blocks already allocated, which on ext4 costs less
than writing into a file that grows (``benchmarks/bench_output_write.py``). Bytes go in with
``pwrite`` at their offsets, so the merge's worker threads write their chunks as they finish them,
in any order. Finished ranges are handed to the kernel's writeback as they complete
(``sync_file_range``, on a thread of its own, since starting writeback can wait for the disk's
queue), so the caller's final ``fsync`` has little left to wait for.

Where fresh page-cache memory is dear (a VM that must first get freed memory back from its host), a
``pwrite`` copies slowly, and ``pwrite``s to one file take its inode lock in turn, so the workers'
writes queue; page faults into a shared map of the file run on every thread at once. So large writes
into a reserved file on ext4 or XFS are ``pwrite``s whose CPU time is measured until the median of
the latest few copied at under ``MAPPED_BELOW_BYTES_PER_S``; from then on the file's large writes are
stored through a map of their own range, made for that write and dropped after it. Where memory is
cheap ``pwrite`` stays, being the faster of the two there (``benchmarks/bench_output_write.py``
measures both, with memory freed seconds or moments before). On those filesystems a store into
reserved blocks cannot run out of space (elsewhere, e.g. on btrfs, a store that fails is a SIGBUS,
not an error code), so every other filesystem keeps ``pwrite``. The bytes are the same either way.

With ``direct``, the whole pages of each large write bypass the page cache (``O_DIRECT``) and only
its unaligned edges go through it: the output never fills the page cache (a merge larger than memory
evicts nothing), and where getting fresh memory is slow (a VM that gives freed memory back to its
host) it does not pay for it; each write then waits for the disk, so it helps only there.

Where the filesystem cannot reserve blocks (no ``fallocate``: some network and FUSE filesystems,
non-Linux systems) the same writes simply grow the file; the bytes are the same.

    with OutputFile(path, nbytes) as out:
        out.write(header_bytes)                      # appends
        out.write_at(offset, tensor.view(torch.uint8))  # places; threads may do this at once
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ckptmerge.io import libc
from ckptmerge.io.libc import filesystem_type

WRITEBACK_BYTES = 32 << 20  # start writeback each time this much more is written
DIRECT_ALIGN = 4096  # direct writes cover whole pages (a multiple of any usual logical block size)
DIRECT_MIN_BYTES = 1 << 20  # smaller writes go through the page cache
STAGING_BYTES = 16 << 20  # per writing thread, page-aligned
MAPPED_MIN_BYTES = 1 << 20  # smaller writes go through pwrite, and are not measured
PROBE_WRITES = 3  # map once the median of this many latest large pwrites was slow (0: map at once)
MAPPED_BELOW_BYTES_PER_S = 2e9  # map when those pwrites copied slower than this per CPU second (about
# 4.5 GB/s where memory is cheap and 0.45 GB/s where it is dear on the VM of docs/benchmarks.md)
# statfs f_type of the filesystems whose reserved (fallocated) blocks a store through a map cannot run
# out of: ext2/3/4 and XFS. Copy-on-write ones (btrfs, ZFS) need fresh blocks for every write. tmpfs
# would be safe too, but there a map costs more than pwrite (bench_output_write.py --work /dev/shm/...).
_MAPPABLE_FILESYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs"}
_NO_RESERVE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputFile:
    """``path``, created (or truncated) to hold exactly ``nbytes``, its disk reserved up front."""

    def __init__(self, path: Path, nbytes: int, *, direct: bool = False):
        """``direct``: write whole pages of large writes with ``O_DIRECT``, bypassing the page cache, where
        the filesystem allows (``--direct-io``)."""
        self.path, self.nbytes, self.position = Path(path), nbytes, 0
        self._lock = threading.Lock()
        self._unflushed = 0  # bytes of small writes not yet handed to writeback
        self._flusher: ThreadPoolExecutor | None = None  # starts writeback, which can block, off the writers' threads
        self._flushes: list[Future] = []
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._direct: _DirectWrites | None = None
        self._mapped: _MappedWrites | None = None  # large writes go through maps (decided by the probe)
        self._mappable: _MappedWrites | None = None  # could: the probe is still measuring pwrites
        self._probe: list[float] = []  # bytes per CPU second of the latest large pwrites
        try:
            self.reserved = nbytes > 0 and reserve(self._fd, nbytes, self.path)
            if self.reserved and direct:
                self._direct = _DirectWrites.open(self.path)
            elif self.reserved:
                self._mappable = _MappedWrites.open(self.path, self._fd)
                if PROBE_WRITES == 0:  # no measuring: map from the first large write
                    self._mapped, self._mappable = self._mappable, None
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        """Whether large writes bypass the page cache (``O_DIRECT``)."""
        return self._direct is not None

    def write(self, data: torch.Tensor | bytes) -> None:
        """Append ``data`` (bytes, or a contiguous CPU tensor whose bytes are written as they lie)."""
        self.position += self.write_at(self.position, data)

    def write_at(self, offset: int, data: torch.Tensor | bytes) -> int:
        """Place ``data`` at byte ``offset``; returns its size. Threads may call this at once for disjoint ranges."""
        src = _as_bytes(data)
        n = src.numel()
        if offset + n > self.nbytes:
            raise RuntimeError(f"{self.path}: {offset + n} bytes written into a file declared {self.nbytes}")
        middle = self._direct.aligned_part(offset, n) if self._direct is not None else None
        if middle is None:
            if self._mapped is not None and n >= MAPPED_MIN_BYTES:
                self._mapped.write(src, offset)
            else:
                measure = self._mappable is not None and n >= MAPPED_MIN_BYTES
                cpu_s = time.thread_time() if measure else 0.0
                _write_all(self._fd, src, offset, self.path)
                if measure:
                    self._measured(n, time.thread_time() - cpu_s)
            self._written(offset, n)
            return n
        begin, end = middle  # page-aligned: the edges go through the page cache, the rest straight to disk
        _write_all(self._fd, src[:begin - offset], offset, self.path)
        _write_all(self._fd, src[end - offset:], end, self.path)
        self._written(offset, n - (end - begin))
        if not self._direct.write(src[begin - offset:end - offset], begin):
            self._direct = None  # this file refuses direct writes after all: the page cache from now on
            _write_all(self._fd, src[begin - offset:end - offset], begin, self.path)
            self._written(begin, end - begin)
        return n

    def close(self) -> None:
        """Close (idempotent); the bytes reach the disk with the caller's ``fsync``. Raises a writeback error."""
        for writes in (self._direct, self._mapped, self._mappable):  # at most one is set
            if writes is not None:
                writes.close()
        self._direct = self._mapped = self._mappable = None
        if self._flusher is not None:
            self._flusher.shutdown()
            self._flusher = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        flushes, self._flushes = self._flushes, []
        for flush in flushes:
            flush.result()

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mapped(self) -> bool:
        """Whether large writes are now stored through maps (see the module's docstring)."""
        return self._mapped is not None

    def _measured(self, nbytes: int, cpu_s: float) -> None:
        """Record one large pwrite: once the median of the last ``PROBE_WRITES`` is slow, map from now on.
        (Memory can turn dear part-way: the first writes may use memory freed moments before.)"""
        with self._lock:
            if self._mappable is None:
                return
            self._probe = [*self._probe[1 - PROBE_WRITES:], nbytes / max(cpu_s, 1e-9)]
            if len(self._probe) == PROBE_WRITES and sorted(self._probe)[PROBE_WRITES // 2] < MAPPED_BELOW_BYTES_PER_S:
                self._mapped, self._mappable = self._mappable, None

    def _written(self, offset: int, n: int) -> None:
        """Hand finished bytes to writeback, on the flusher thread: a large write's own range, small ones a
        whole file's worth at a time (0 bytes: to the end of the file)."""
        with self._lock:
            if n < WRITEBACK_BYTES // 8:
                self._unflushed += n
                if self._unflushed < WRITEBACK_BYTES:
                    return
                self._unflushed, offset, n = 0, 0, 0
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(1, thread_name_prefix="ckptmerge-writeback")
            self._flushes = [f for f in self._flushes if not f.done() or f.exception() is not None]
            self._flushes.append(self._flusher.submit(start_writeback, self._fd, offset, n, self.path))


class _DirectWrites:
    """Writes of whole pages that bypass the page cache (``O_DIRECT``), from a page-aligned staging buffer
    per thread. The page cache is never filled with the output (on a VM that must first get fresh memory
    back from its host, filling it dominated a warm merge), and the disk is written while the caller
    merges. A write's unaligned edges are the caller's, through the page cache: they never share a page
    with a direct write, so the two never meet in one page."""

    def __init__(self, fd: int, path: Path):
        self._fd, self._path = fd, path
        self._staging = threading.local()

    @classmethod
    def open(cls, path: Path) -> "_DirectWrites | None":
        """None where the filesystem refuses ``O_DIRECT`` (tmpfs on older kernels, some network ones)."""
        try:
            return cls(os.open(path, os.O_WRONLY | os.O_DIRECT), path)
        except (OSError, AttributeError):
            return None

    @staticmethod
    def aligned_part(offset: int, nbytes: int) -> tuple[int, int] | None:
        """The whole pages inside ``[offset, offset + nbytes)``, when there are enough to be worth it."""
        begin = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        end = (offset + nbytes) // DIRECT_ALIGN * DIRECT_ALIGN
        return (begin, end) if end - begin >= DIRECT_MIN_BYTES else None

    def write(self, src: torch.Tensor, offset: int) -> bool:
        """Write page-aligned ``src`` at page-aligned ``offset``; False if the file refuses (EINVAL)."""
        for start in range(0, src.numel(), STAGING_BYTES):
            piece = src[start:start + STAGING_BYTES]
            staging = self._buffer()[:piece.numel()]
            staging.copy_(piece)
            view = memoryview(staging.numpy())
            while view.nbytes:
                try:
                    written = os.pwrite(self._fd, view, offset + start)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        return False
                    raise OSError(exc.errno, exc.strerror, str(self._path)) from None
                view, start = view[written:], start + written
        return True

    def close(self) -> None:
        os.close(self._fd)

    def _buffer(self) -> torch.Tensor:
        buffer = getattr(self._staging, "buffer", None)
        if buffer is None:
            raw = np.empty(STAGING_BYTES + DIRECT_ALIGN, dtype=np.uint8)
            shift = -raw.ctypes.data % DIRECT_ALIGN
            buffer = self._staging.buffer = torch.from_numpy(raw[shift:shift + STAGING_BYTES])
        return buffer


class _MappedWrites:
    """Large writes stored through a shared map of just their own range, made and dropped per write, so
    that threads writing one file at once do not queue on its inode lock as ``pwrite``s do. The pages
    stay dirty in the page cache after the map is gone, for writeback and the caller's ``fsync``."""

    def __init__(self, fd: int, path: Path):
        self._fd, self._path = fd, path

    @classmethod
    def open(cls, path: Path, fd: int) -> "_MappedWrites | None":
        """None unless ``path`` (reserved by the caller) lies on a filesystem in ``_MAPPABLE_FILESYSTEMS``."""
        if filesystem_type(fd) not in _MAPPABLE_FILESYSTEMS:
            return None
        try:
            return cls(os.open(path, os.O_RDWR), path)  # a shared writable map needs a readable descriptor
        except OSError:
            return None

    def write(self, src: torch.Tensor, offset: int) -> None:
        begin = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(self._fd, offset + src.numel() - begin, offset=begin)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self._path)) from None
        try:
            dst = np.frombuffer(region, dtype=np.uint8, count=src.numel(), offset=offset - begin)
            torch.from_numpy(dst).copy_(src)
            del dst  # the map cannot close while a view of it is alive
        finally:
            region.close()

    def close(self) -> None:
        os.close(self._fd)


def _as_bytes(data: torch.Tensor | bytes) -> torch.Tensor:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    flat = data.reshape(-1)
    if not flat.is_contiguous() or flat.device.type != "cpu":
        raise ValueError("OutputFile.write needs a contiguous CPU tensor")
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _write_all(fd: int, src: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(src.numpy()).cast("B")
    while view.nbytes:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        view, offset = view[written:], offset + written


def reserve(fd: int, nbytes: int, path: Path) -> bool:
    """Allocate ``nbytes`` of disk for ``fd``: True when done, False when this filesystem cannot; an
    OSError naming ``path`` when the disk (or quota) has no room."""
    if libc.fallocate is None:
        return False
    if libc.fallocate(fd, 0, 0, nbytes) == 0:
        return True
    err = libc.last_errno()
    if err in _NO_RESERVE:
        return False
    raise OSError(err, f"{os.strerror(err)} (reserving {nbytes / 1e9:.2f} GB for the output)", str(path))


def start_writeback(fd: int, offset: int, nbytes: int, path: Path) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk, without waiting for it."""
    if libc.sync_file_range is not None:
        if libc.sync_file_range(fd, offset, nbytes, libc.SYNC_FILE_RANGE_WRITE) == 0:
            return
        err = libc.last_errno()
        if err not in _NO_RESERVE:
            raise OSError(err, os.strerror(err), str(path))
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)  # starts writeback on Linux
