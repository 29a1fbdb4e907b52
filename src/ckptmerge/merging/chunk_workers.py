"""The CPU merge's workers: one thread per core, each merging every W-th chunk and writing it at its place.

No worker waits for another until the end, so reading (each worker's own page-ahead thread), page
faults, summing and writing all run on every core. Each chunk is merged by the same steps as in the
ordered loop of ``merging/engine.py`` (``merging/chunk_steps.py``), so the bits do not depend on which
worker merged it. Used by ``run_engine`` when accumulating on the CPU from byte ranges into a sink that
places chunks by row (``write_rows``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

from ckptmerge.io.tensor_info import CheckpointReader
from ckptmerge.merging.device import Stage
from ckptmerge.merging.chunk_steps import (Chunk, ChunkInputs, EngineStats, ReadSettings, TensorSink,
                                           chunk_input_bytes, copy_chunk, merge_chunk)
from ckptmerge.merging.plan import MergePlan


def worker_count(plan: MergePlan, readers: Sequence[CheckpointReader], chunks: list[Chunk], sink: TensorSink,
                  target: torch.device, home: torch.device, workers: int | None) -> int:
    """Threads that can merge side by side: 1 unless accumulating on the CPU from byte ranges into a sink
    that places chunks by row."""
    if target.type != "cpu" or home.type != "cpu" or not hasattr(sink, "write_rows"):
        return 1
    tasks = {chunk.task.name: chunk.task for chunk in chunks if chunk.task.merged}
    if any(readers[i].file_range(name, 0, 0) is None for name in tasks for i in plan.active):
        return 1
    return min(workers or torch.get_num_threads(), sum(chunk.task.merged for chunk in chunks))


class _FirstFailure:
    """The error of the earliest chunk, in plan order, that failed: workers skip chunks after it but
    finish those before it, so which error is reported does not depend on thread timing."""

    def __init__(self):
        self._lock = threading.Lock()
        self.index: float = math.inf
        self.error: BaseException | None = None
        self.stopped = False

    def record(self, index: int, error: BaseException) -> None:
        with self._lock:
            if index < self.index:
                self.index, self.error = index, error

    def skips(self, index: int) -> bool:
        return self.stopped or index > self.index


def run_workers(plan: MergePlan, readers: Sequence[CheckpointReader], sink: TensorSink, chunks: list[Chunk],
                 workers: int, reads: ReadSettings, allow_nonfinite: bool,
                 on_bytes: Callable[[int], None] | None) -> EngineStats:
    """``workers`` threads merge every ``workers``-th float chunk and write it in place; this thread
    copies the non-float tensors. Each worker accumulates single-threaded, so torch runs one intra-op
    thread meanwhile (no OpenMP team spinning beside the workers)."""
    stats, failure, lock = EngineStats(), _FirstFailure(), threading.Lock()

    def progress(nbytes: int) -> None:
        with lock:
            stats.bytes_read += nbytes
            if on_bytes is not None:
                on_bytes(nbytes)

    merged = [(index, chunk) for index, chunk in enumerate(chunks) if chunk.task.merged]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ckptmerge-merge") as pool:
            futures = [pool.submit(_merge_share, plan, readers, sink, merged[w::workers], reads, allow_nonfinite,
                                   progress, failure) for w in range(workers)]
            try:
                for chunk in chunks:
                    if not chunk.task.merged:
                        sink.write_rows(chunk.task.name, chunk.start, copy_chunk(plan, readers, chunk, stats))
                        progress(chunk_input_bytes(plan, readers, chunk))
                for future in futures:
                    future.result()
            except BaseException:
                failure.stopped = True  # an interrupt or a failed copy: workers stop after their chunk
                raise
    finally:
        torch.set_num_threads(saved)
    if failure.error is not None:
        raise failure.error
    return stats


def _merge_share(plan: MergePlan, readers: Sequence[CheckpointReader], sink: TensorSink,
                 share: list[tuple[int, Chunk]], reads: ReadSettings, allow_nonfinite: bool,
                 progress: Callable[[int], None], failure: _FirstFailure) -> None:
    """One worker: merge its chunks in order, their inputs' pages brought in ahead, each written at its place."""
    index = -1  # a failure before the first chunk ranks first
    try:
        with ExitStack() as stack:
            cpu = torch.device("cpu")
            stage = stack.enter_context(Stage(cpu, cpu, threads=1))
            inputs = ChunkInputs(plan, readers, [chunk for _, chunk in share], reads, stage, stack)
            for index, chunk in share:
                if failure.skips(index):
                    return
                sink.write_rows(chunk.task.name, chunk.start,
                                merge_chunk(plan, readers, inputs, chunk, stage, allow_nonfinite))
                progress(chunk_input_bytes(plan, readers, chunk))
    except BaseException as exc:  # reported by the caller, earliest chunk first
        failure.record(index, exc)
