"""Bring the pages of memory-mapped tensor views into memory ahead of their use, on a background thread.

The CPU merge sums zero-copy views of its inputs' page cache (``SafetensorsReader.get_rows``): no copy
into a buffer, no anonymous memory. What such a view costs is its page faults: on a cold cache each
one waits for the disk, on a warm one it still maps pages one by one. ``PageAhead`` takes the views
in the order they will be summed (any iterable, consumed lazily on its thread), asks the kernel to
map each one's pages (``madvise(MADV_POPULATE_READ)``, Linux 5.14+; elsewhere it touches one byte per
page) and hands the views over in order, at most ``ahead`` of them ready at a time. The disk reads
and the faults happen on that thread, in parallel with the accumulation on the others.

    with PageAhead(((key, view) for ...), ahead=8) as pages:
        for key in keys:
            got, view = pages.next()     # view's pages are resident
            use(view)
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterable
from typing import Any

import torch

from ckptmerge.io import libc

_PAGE_BYTES = mmap.PAGESIZE
_DONE = object()


class PageAhead:
    """Yields ``(key, view)`` pairs of ``items`` in order, each view's pages made resident on a thread."""

    def __init__(self, items: Iterable[tuple[Any, torch.Tensor]], *, ahead: int):
        self._items = items
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckptmerge-page-ahead", daemon=True)
        self._thread.start()

    def next(self) -> tuple[Any, torch.Tensor]:
        """The next pair (blocks until its pages are in); raises what the thread raised."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise StopIteration("no more views")
        return item

    def close(self) -> None:
        """Stop the thread (after the view it is on) and drop the views it prepared."""
        self._closed = True
        while self._thread.is_alive():
            try:
                self._ready.get(timeout=0.05)  # unblock a put() waiting for room
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "PageAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            for key, view in self._items:
                if self._closed:
                    return
                make_resident(view)
                self._ready.put((key, view))
            self._ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._ready.put(exc)


def make_resident(view: torch.Tensor) -> None:
    """Map every page under a contiguous CPU tensor (waiting for the disk if it must)."""
    nbytes = view.numel() * view.element_size()
    if nbytes == 0:
        return
    start = view.data_ptr() & ~(_PAGE_BYTES - 1)
    length = view.data_ptr() + nbytes - start
    if libc.madvise is not None and libc.madvise(start, length, libc.MADV_POPULATE_READ) == 0:
        return
    flat = view.reshape(-1).view(torch.uint8)  # an older kernel or another OS: touch one byte per page
    flat[::_PAGE_BYTES].sum()
