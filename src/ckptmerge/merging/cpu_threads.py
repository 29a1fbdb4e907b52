"""Element-wise work on large CPU tensors, split across every core by a small pool of Python threads.

torch's own intra-op threads (OpenMP) spin between parallel regions; a merge calls many short
element-wise operations while a read-ahead thread copies file data, so the spinning takes the very
core that thread needs, and on a shared machine it burns CPU others wait for. From its first large
operation until the merge ends, ``CpuThreads`` sets torch to one intra-op thread and instead splits
each large operation into equal, cache-line-aligned parts: one per core, run on threads that sleep
when idle (torch releases the GIL inside every operation). Small merges (online averaging of a tiny
model) never change torch's settings. Each element is computed exactly as in one whole-tensor operation.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_PARALLEL_ELEMENTS = 1 << 18  # below this, splitting costs more than it saves
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
        step = -(-numel // self.threads // _ALIGN_ELEMENTS) * _ALIGN_ELEMENTS
        bounds = [(b, min(b + step, numel)) for b in range(0, numel, step)]
        if self._pool is None:
            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ckptmerge-accumulate")
        futures = [self._pool.submit(fn, *(t[b:e] for t in tensors)) for b, e in bounds[1:]]
        first = fn(*(t[bounds[0][0]:bounds[0][1]] for t in tensors))
        return [first, *(f.result() for f in futures)]
