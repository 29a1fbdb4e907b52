"""Read byte ranges of files ahead of their use, on a background thread, into a bounded pool of buffers.

The caller lists every range it will need, in the order it will use them (any iterable, consumed
lazily). A reader thread reads them in that order with ``os.preadv`` into at most ``slots``
reusable host buffers of ``slot_bytes`` each (page-locked when the consumer copies them to an
accelerator) and hands them over one at a time; it waits when every slot is in use, so the memory
held is ``slots * slot_bytes`` whatever the number or size of the files. Files are opened with
``POSIX_FADV_SEQUENTIAL``, so the kernel reads each one ahead of the thread in large requests;
reading several files side by side keeps several such streams in flight.

    with ReadAhead(ranges, slot_bytes=8 << 20, slots=8) as ahead:
        for rng in ranges:
            slot = ahead.next()      # slot.data: uint8 tensor holding rng's bytes
            use(slot.data)
            ahead.release(slot)      # or release(slot, fence) once an async copy of it has finished
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.tensor_info import FileRange


class Fence:
    """Anything whose ``synchronize()`` returns once a buffer may be overwritten (e.g. a ``torch.Event``)."""

    def synchronize(self) -> None: ...


@dataclass
class Slot:
    """One pooled buffer; ``data`` is its first ``range.nbytes`` bytes, holding the bytes of ``range``."""

    buffer: torch.Tensor
    range: FileRange | None = None
    fence: Fence | None = None

    @property
    def data(self) -> torch.Tensor:
        return self.buffer[:self.range.nbytes]


class ReadAhead:
    """Reads ``ranges`` in order on a background thread; ``next()`` returns them in the same order."""

    def __init__(self, ranges: Iterable[FileRange], *, slot_bytes: int, slots: int, pin_memory: bool = False):
        self._ranges = ranges
        self._slot_bytes, self._slots_left, self._pin_memory = slot_bytes, max(1, slots), pin_memory
        self._fds: dict = {}
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckptmerge-read-ahead", daemon=True)
        self._thread.start()

    def next(self) -> Slot:
        """The next range's bytes (blocks until read); raises what the reader thread raised."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, slot: Slot, fence: Fence | None = None) -> None:
        """Give a slot back; with a fence, it is reused only after ``fence.synchronize()``."""
        slot.fence = fence
        self._free.put(slot)

    def close(self) -> None:
        """Stop the reader thread (it finishes its current read at most) and close the files."""
        self._closed = True
        self._free.put(None)
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            for rng in self._ranges:
                if rng.nbytes > self._slot_bytes:
                    raise ValueError(f"{rng.path}: a range of {rng.nbytes} bytes does not fit a {self._slot_bytes}-byte slot")
                slot = self._take_slot()
                if slot is None or self._closed:
                    return
                self._read(rng, slot.buffer[:rng.nbytes])
                slot.range = rng
                self._ready.put(slot)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._ready.put(exc)

    def _take_slot(self) -> Slot | None:
        """A free slot (a new one while fewer than ``slots`` exist), once its last copy has finished."""
        if self._slots_left and self._free.empty():
            self._slots_left -= 1
            return Slot(torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=self._pin_memory))
        slot = self._free.get()
        if slot is not None and slot.fence is not None:
            slot.fence.synchronize()
            slot.fence = None
        return slot

    def _read(self, rng: FileRange, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())
        done = 0
        while done < rng.nbytes:
            n = os.preadv(self._fd(rng), [view[done:]], rng.offset + done)
            if n == 0:
                raise CheckpointFormatError(f"{rng.path}: ends at byte {rng.offset + done}, before the "
                                            f"{rng.nbytes} bytes at offset {rng.offset} (file truncated while merging?)")
            done += n

    def _fd(self, rng: FileRange) -> int:
        fd = self._fds.get(rng.path)
        if fd is None:
            fd = self._fds[rng.path] = os.open(rng.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd
