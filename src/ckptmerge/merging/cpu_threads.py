"""Element-wise work on large CPU tensors, split across every core by a small pool of Python threads.

torch's own intra-op threads (OpenMP) spin between parallel regions; a merge calls many short
element-wise operations while a read-ahead thread copies file data, so the spinning takes the very
core that thread needs, and on a shared machine it burns CPU others wait for. From its first large
operation until the merge ends, ``CpuThreads`` sets torch to one intra-op thread and instead splits
each large operation into equal, cache-line-aligned parts (a few per core) run on threads that sleep
when idle (torch releases the GIL inside every operation); the calling thread takes back the parts no
thread has started, so a core busy with reading or writing does not hold the others up. Small merges (online averaging of a tiny
model) never change torch's settings. Each element is computed exactly as in one whole-tensor operation.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_PARALLEL_ELEMENTS = 1 << 18  # below this, splitting costs more than it saves
PARTS_PER_THREAD = 4  # smaller parts even out the threads when other work takes a core for a while
_ALIGN_ELEMENTS = 64


class CpuThreads:
    """Context manager: ``map(fn, *flat_tensors)`` runs ``fn`` on aligned parts of equal-length tensors."""

    def __init__(self, threads: int | None = None):
        self.threads = max(1, threads or torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None
        self._saved = torch.get_num_threads()

    def __enter__(self) -> "CpuThreads":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            torch.set_num_threads(self._saved)

    def map(self, fn: Callable[..., object], *tensors: torch.Tensor) -> list[object]:
        """``[fn(*parts) for parts]`` over 1-d tensors of one length, split into aligned parts run in parallel."""
        numel = tensors[0].numel()
        if self.threads == 1 or numel < MIN_PARALLEL_ELEMENTS:
            return [fn(*tensors)]
        parts = min(self.threads * PARTS_PER_THREAD, max(self.threads, numel // MIN_PARALLEL_ELEMENTS))
        step = -(-numel // parts // _ALIGN_ELEMENTS) * _ALIGN_ELEMENTS
        bounds = [(b, min(b + step, numel)) for b in range(0, numel, step)]
        if self._pool is None:
            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ckptmerge-accumulate")
        futures = [self._pool.submit(fn, *(t[b:e] for t in tensors)) for b, e in bounds[1:]]
        results = {0: fn(*(t[bounds[0][0]:bounds[0][1]] for t in tensors))}
        for i in range(len(futures) - 1, -1, -1):  # parts no thread has started yet: run them here
            if futures[i].cancel():
                b, e = bounds[i + 1]
                results[i + 1] = fn(*(t[b:e] for t in tensors))
        return [results[0], *(results[i + 1] if f.cancelled() else f.result() for i, f in enumerate(futures))]
