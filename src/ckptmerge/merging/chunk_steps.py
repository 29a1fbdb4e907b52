"""One chunk's steps, shared by the ordered loop (``merging/engine.py``) and the CPU workers
(``merging/chunk_workers.py``): split a plan into row chunks, read a chunk's inputs, merge it, copy it.

A merged chunk's accumulator (fp32, or fp64 on request) is zeroed on the compute device, and each
input with a non-zero coefficient is added in place, ``acc += c_i * x_i``, in input order, one
element-wise pass each: the result is the same bits however the chunk is sliced, and whichever
thread merges it. Inputs that are plain byte ranges (safetensors) are read in slices of at most
``slot_bytes``: on the CPU as zero-copy views of their maps, their pages brought in ahead
(``ckptmerge.io.page_ahead``); for an accelerator copied ahead into page-locked buffers
(``ckptmerge.io.read_ahead``). Non-float tensors are copied from the newest checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ckptmerge.errors import NonFiniteTensorError
from ckptmerge.io.page_ahead import PageAhead
from ckptmerge.io.read_ahead import ReadAhead
from ckptmerge.io.tensor_info import CheckpointReader, FileRange
from ckptmerge.merging.device import Stage
from ckptmerge.merging.plan import MergePlan, TensorTask


@dataclass(frozen=True)
class ReadSettings:
    """How inputs are read ahead: up to ``slots`` host buffers of ``slot_bytes`` each."""

    slot_bytes: int = 8 << 20
    slots: int = 8


class TensorSink(Protocol):
    """Takes merged chunks in plan order (``write``). A sink that can also place a chunk by its first row,
    from several threads at once (``write_rows(name, start_row, chunk)``), gets the CPU workers."""

    def write(self, name: str, chunk: torch.Tensor) -> None: ...


@dataclass
class EngineStats:
    bytes_read: int = 0
    differing_buffers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of one tensor of the plan (the whole tensor when it is copied, or a scalar)."""

    task: TensorTask
    start: int
    stop: int


def plan_chunks(plan: MergePlan, chunk_bytes: int) -> list[Chunk]:
    """Split each tensor into row ranges whose accumulator fits in ``chunk_bytes``."""
    chunks = []
    itemsize = plan.accum_dtype.itemsize
    for task in plan.tasks:
        rows = task.shape[0] if task.shape else 1
        row_bytes = (task.info.numel // rows if rows else 0) * itemsize
        per_chunk = max(1, chunk_bytes // row_bytes) if row_bytes and task.merged else max(rows, 1)
        chunks.extend(Chunk(task, s, min(rows, s + per_chunk)) for s in range(0, max(rows, 1), per_chunk))
    return chunks


def chunk_input_bytes(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: Chunk) -> int:
    """Bytes of input a chunk reads: the active inputs' for a merged chunk, every input's for a copied one
    (each is compared with the newest)."""
    sources = plan.active if chunk.task.merged else range(len(readers))
    return sum(readers[i].info(chunk.task.name).dtype.itemsize for i in sources) * _chunk_numel(chunk)


@dataclass(frozen=True)
class _Part:
    """Elements ``[begin, end)`` of a flattened chunk of input ``input``, stored as ``dtype`` at ``range``."""

    input: int
    begin: int
    end: int
    dtype: torch.dtype
    range: FileRange


def _file_parts(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: Chunk, slot_bytes: int) -> list[_Part] | None:
    """A merged chunk's reads, in the order they are summed; None unless every input is a plain byte range.

    Slice by slice, and within a slice input by input: every element still sums the inputs in order
    (the same bits as input after input over the whole chunk), while all inputs' files are read
    side by side, each front to back, in requests of up to ``slot_bytes``.
    """
    name = chunk.task.name
    ranges = [readers[i].file_range(name, chunk.start, chunk.stop) for i in plan.active]
    if any(r is None for r in ranges):
        return None
    dtypes = [readers[i].info(name).dtype for i in plan.active]
    numel = _chunk_numel(chunk)
    step = max(1, slot_bytes // max(d.itemsize for d in dtypes))
    return [_Part(i, begin, end, dtype, FileRange(rng.path, rng.offset + begin * dtype.itemsize, (end - begin) * dtype.itemsize))
            for begin in range(0, numel, step) for end in [min(numel, begin + step)]
            for i, rng, dtype in zip(plan.active, ranges, dtypes)]


class ChunkInputs:
    """Hands out each file part's elements in the order of ``_file_parts`` over all chunks: on the CPU as
    zero-copy views of the inputs' maps, their pages brought in ahead (``PageAhead``); for an accelerator
    copied ahead into page-locked buffers (``ReadAhead``), which asynchronous copies need."""

    def __init__(self, plan: MergePlan, readers: Sequence[CheckpointReader], chunks: list[Chunk],
                 reads: ReadSettings, stage: Stage, stack: ExitStack):
        self.slot_bytes, self._stage = reads.slot_bytes, stage
        self._copies = stage.uses_accelerator
        if self._copies:
            ranges = (part.range for chunk in chunks if chunk.task.merged
                      for part in _file_parts(plan, readers, chunk, reads.slot_bytes) or [])
            self._ahead = stack.enter_context(ReadAhead(ranges, slot_bytes=reads.slot_bytes, slots=reads.slots,
                                                        pin_memory=True))
        else:
            self._pages = stack.enter_context(PageAhead(_part_views(plan, readers, chunks, reads.slot_bytes),
                                                        ahead=reads.slots))

    @contextmanager
    def read(self, part: _Part) -> Iterator[torch.Tensor]:
        """The part's elements (a host tensor, valid inside the block)."""
        if not self._copies:
            got, view = self._pages.next()
            assert got == part.range, "read-ahead order diverged from the merge order"
            yield view
            return
        slot = self._ahead.next()
        assert slot.range == part.range, "read-ahead order diverged from the merge order"
        yield slot.data.view(part.dtype)
        self._ahead.release(slot, self._stage.fence())


def _part_views(plan: MergePlan, readers: Sequence[CheckpointReader], chunks: list[Chunk],
                slot_bytes: int) -> Iterator[tuple[FileRange, torch.Tensor]]:
    """``(range, zero-copy view)`` of every file part, in the order ``merge_chunk`` sums them."""
    for chunk in chunks:
        parts = _file_parts(plan, readers, chunk, slot_bytes) if chunk.task.merged else None
        rows: dict[int, torch.Tensor] = {}
        for part in parts or []:
            if part.input not in rows:
                rows[part.input] = readers[part.input].get_rows(chunk.task.name, chunk.start, chunk.stop).reshape(-1)
            yield part.range, rows[part.input][part.begin:part.end]


def merge_chunk(plan: MergePlan, readers: Sequence[CheckpointReader], inputs: ChunkInputs, chunk: Chunk,
                stage: Stage, allow_nonfinite: bool) -> torch.Tensor:
    """The merged chunk in the output dtype, on the inputs' device; raises NonFiniteTensorError unless allowed."""
    acc = stage.zeros(plan.accum_dtype, _chunk_shape(chunk))
    parts = _file_parts(plan, readers, chunk, inputs.slot_bytes)
    if parts is None:  # tensors in memory (or assembled by the reader): sum them whole, input by input
        for i in plan.active:
            stage.add(acc, readers[i].get_rows(chunk.task.name, chunk.start, chunk.stop), plan.coeffs[i])
    else:
        flat = acc.view(-1)
        for part in parts:
            with inputs.read(part) as values:
                stage.add(flat[part.begin:part.end], values, plan.coeffs[part.input])
    return _finish(plan, readers, chunk, acc, stage, allow_nonfinite)


def _finish(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: Chunk, acc: torch.Tensor,
            stage: Stage, allow_nonfinite: bool) -> torch.Tensor:
    """Check the accumulated chunk, cast it to the output dtype, check it again, and bring it to the
    inputs' device: the one place a merged chunk is finalised."""
    if not allow_nonfinite and not stage.all_finite(acc):
        _raise_nonfinite(plan, readers, chunk)
    out = stage.cast(acc, chunk.task.out_dtype)
    if out is not acc and not allow_nonfinite:
        check_cast_finite(chunk.task.name, out, stage)
    return stage.download(out)


def check_cast_finite(name: str, out: torch.Tensor, stage: Stage) -> None:
    """After the cast to the output dtype: a finite fp32 value can still overflow (float16 tops out at 65504)."""
    if out.is_floating_point() and not stage.all_finite(out):
        raise NonFiniteTensorError(f"tensor {name!r}: the merged value overflows the output dtype {out.dtype} "
                                   f"(finite in the accumulator, Inf after the cast); nothing was written. "
                                   f"Choose a wider --out-dtype (bfloat16 or float32), or pass --allow-nonfinite.")


def _chunk_numel(chunk: Chunk) -> int:
    shape = chunk.task.shape
    if not shape:
        return 1
    return (chunk.stop - chunk.start) * (chunk.task.info.numel // shape[0] if shape[0] else 0)


def _chunk_shape(chunk: Chunk) -> tuple[int, ...]:
    shape = chunk.task.shape
    return (chunk.stop - chunk.start, *shape[1:]) if shape else ()


def copy_chunk(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: Chunk, stats: EngineStats) -> torch.Tensor:
    """A non-float tensor: the newest checkpoint's value, with a warning (and a note in ``stats``) when
    an older input's differs."""
    name = chunk.task.name
    newest = readers[plan.newest].get(name)
    differing = [readers[i].path.name for i in range(len(readers) - 1) if not torch.equal(readers[i].get(name), newest)]
    if differing:
        stats.differing_buffers.append(name)
        warnings.warn(f"non-float tensor {name!r} differs across inputs ({', '.join(differing)} vs the newest "
                      f"{readers[plan.newest].path.name}); copying the newest checkpoint's value", stacklevel=2)
    return newest


def _raise_nonfinite(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: Chunk) -> None:
    name = chunk.task.name
    for i in plan.active:
        if not bool(torch.isfinite(readers[i].get_rows(name, chunk.start, chunk.stop)).all()):
            raise NonFiniteTensorError(
                f"{readers[i].path}: tensor {name!r} contains NaN or Inf; nothing was written. "
                f"Drop this checkpoint from the window, or pass --allow-nonfinite to merge it anyway.")
    raise NonFiniteTensorError(f"tensor {name!r}: the merged value overflows {plan.accum_dtype}; nothing was written. "
                               f"Use --accum-dtype float64, or --allow-nonfinite to keep it.")
