"""The streaming merge loop: one output tensor (or row chunk) at a time, each input read once.

Each chunk is merged by the steps of ``merging/chunk_steps.py`` (fp32 accumulation, or fp64 on
request, input after input): the result is the same bits however the chunk is sliced, and whichever
thread merges it.

On the CPU, when every input is a plain byte range (safetensors) and the sink places chunks by row
(``write_rows``: the safetensors writer, a dict), one worker thread per core merges every W-th chunk
and writes it at its place at once (``merging/chunk_workers.py``): reading, summing, page faults and
output writes all run on every core, with no thread waiting for another.

Otherwise (an accelerator ``device``, e.g. ``"cuda"``; inputs held in memory, torch files, DCP
folders) chunks are merged in order here. For an accelerator a thread reads the slices into
page-locked buffers (``ckptmerge.io.read_ahead``) for asynchronous copies; fp32 accumulation happens
there and results come back to the host for the sink. With ``write_behind`` each chunk is written
while the next is merged.

Anonymous memory, the same for any number of inputs: per worker one accumulator chunk (at most
``chunk_bytes``) and one output-dtype chunk when the output dtype differs; on the sequential path
two of each with ``write_behind``, and for an accelerator ``slots * slot_bytes`` of page-locked read
buffers and a host copy of the output chunk. Non-float tensors are copied from the newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import torch

from ckptmerge.io.tensor_info import CheckpointReader
from ckptmerge.merging.chunk_steps import (ChunkInputs, EngineStats, ReadSettings, TensorSink, chunk_input_bytes,
                                           copy_chunk, merge_chunk, plan_chunks)
from ckptmerge.merging.chunk_workers import run_workers, worker_count
from ckptmerge.merging.device import Stage, input_device
from ckptmerge.merging.options import DEFAULT_CHUNK_BYTES
from ckptmerge.merging.plan import MergePlan


def run_engine(plan: MergePlan, readers: Sequence[CheckpointReader], sink: TensorSink, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, allow_nonfinite: bool = False,
               on_bytes: Callable[[int], None] | None = None, device: torch.device | str | None = None,
               reads: ReadSettings = ReadSettings(), write_behind: bool = False,
               workers: int | None = None) -> EngineStats:
    """Merge every tensor of ``plan`` into ``sink``.

    ``plan.tasks`` may be any subset of a model's tensors. ``device`` is where float tensors are
    accumulated (default: where the inputs are, the CPU for files); the sink receives each chunk on
    the inputs' device.

    On the CPU, when every input is a plain byte range and the sink places chunks by row
    (``write_rows``), ``workers`` threads (default: one per torch thread, i.e. per core) each merge
    every ``workers``-th chunk and write it in place (``merging/chunk_workers.py``). Otherwise chunks are merged
    one after another and written in plan order; with ``write_behind``, ``sink.write`` then runs on a
    thread while the next chunk is merged (one write in flight, its chunk in a second set of scratch
    tensors). Either way the sink must not be touched by anyone else until this returns.
    """
    chunks = plan_chunks(plan, chunk_bytes)
    home = input_device(plan, readers)
    target = torch.device(device) if device is not None else home
    count = worker_count(plan, readers, chunks, sink, target, home, workers)
    if count > 1:
        return run_workers(plan, readers, sink, chunks, count, reads, allow_nonfinite, on_bytes)
    stats = EngineStats()
    with ExitStack() as stack:
        stage = stack.enter_context(Stage(target, home, buffers=2 if write_behind else 1))
        inputs = ChunkInputs(plan, readers, chunks, reads, stage, stack)
        sink = stack.enter_context(WriteBehind(sink)) if write_behind else sink
        for chunk in chunks:
            if chunk.task.merged:
                out = merge_chunk(plan, readers, inputs, chunk, stage, allow_nonfinite)
            else:
                out = copy_chunk(plan, readers, chunk, stats)
            nbytes = chunk_input_bytes(plan, readers, chunk)
            stats.bytes_read += nbytes
            sink.write(chunk.task.name, out)
            stage.flip()
            if on_bytes is not None:
                on_bytes(nbytes)
    return stats


class WriteBehind:
    """A sink whose ``write`` returns at once and runs on a thread; it waits for the previous write first,
    so writes stay in order and at most one chunk is in flight. Leaving the block waits for the last."""

    def __init__(self, sink: TensorSink):
        self._sink = sink
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptmerge-write")
        self._pending: Future | None = None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        self.wait()
        self._pending = self._pool.submit(self._sink.write, name, chunk)

    def wait(self) -> None:
        """Return once the write in flight is done; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        try:
            if exc_type is None:
                self.wait()  # the last chunk's error, if any, is the merge's
            elif self._pending is not None:
                self._pending.exception()  # failing anyway: let the write finish, keep the first error
        finally:
            self._pool.shutdown()
