"""The streaming merge loop: one output tensor (or row chunk) at a time, each input read once.

For every merged tensor chunk the accumulator (fp32, or fp64 on request) is zeroed and each
input with a non-zero coefficient is added in place, ``acc += c_i * x_i``, straight from the
reader's (usually memory-mapped) view; before each read the next one is handed to the reader as a
prefetch hint so the kernel fetches it while this one is summed. Memory is one accumulator chunk
plus one output-dtype chunk, reused for the whole merge, whatever N or the model size.
Non-float tensors are copied from the newest checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ckptmerge.errors import NonFiniteTensorError
from ckptmerge.io.tensor_info import CheckpointReader
from ckptmerge.merging.plan import MergePlan, TensorTask

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


class TensorSink(Protocol):
    def write(self, name: str, chunk: torch.Tensor) -> None: ...


@dataclass
class EngineStats:
    bytes_read: int = 0
    differing_buffers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Chunk:
    task: TensorTask
    start: int
    stop: int


class _Buffers:
    """Grow-only scratch buffers, reused across tensors so pages are faulted in once."""

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        flat = self._flat.get((dtype, device))
        if flat is None or flat.numel() < numel:
            flat = self._flat[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


def plan_chunks(plan: MergePlan, chunk_bytes: int) -> list[_Chunk]:
    """Split each tensor into row ranges whose accumulator fits in ``chunk_bytes``."""
    chunks = []
    itemsize = plan.accum_dtype.itemsize
    for task in plan.tasks:
        rows = task.shape[0] if task.shape else 1
        row_bytes = (task.info.numel // rows if rows else 0) * itemsize
        per_chunk = max(1, chunk_bytes // row_bytes) if row_bytes and task.merged else max(rows, 1)
        chunks.extend(_Chunk(task, s, min(rows, s + per_chunk)) for s in range(0, max(rows, 1), per_chunk))
    return chunks


def run_engine(plan: MergePlan, readers: Sequence[CheckpointReader], sink: TensorSink, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, allow_nonfinite: bool = False,
               on_bytes: Callable[[int], None] | None = None) -> EngineStats:
    """Merge every tensor of ``plan`` into ``sink``, in plan order."""
    stats = EngineStats()
    buffers = _Buffers()
    chunks = plan_chunks(plan, chunk_bytes)
    reads = [(c, i) for c in chunks for i in (plan.active if c.task.merged else [plan.newest])]
    _prefetch(readers, reads, 0)
    position = 0
    for chunk in chunks:
        if chunk.task.merged:
            out = _merge_chunk(plan, readers, chunk, buffers, reads, position, allow_nonfinite)
            position += len(plan.active)
            inputs = plan.active
        else:
            out = _copy_chunk(plan, readers, chunk, stats)
            position += 1
            inputs = range(len(readers))  # every input is compared with the newest
        nbytes = sum(readers[i].info(chunk.task.name).dtype.itemsize for i in inputs) * _chunk_numel(chunk)
        stats.bytes_read += nbytes
        sink.write(chunk.task.name, out)
        if on_bytes is not None:
            on_bytes(nbytes)
    return stats


def _chunk_numel(chunk: _Chunk) -> int:
    shape = chunk.task.shape
    if not shape:
        return 1
    return (chunk.stop - chunk.start) * (chunk.task.info.numel // shape[0] if shape[0] else 0)


def _chunk_shape(chunk: _Chunk) -> tuple[int, ...]:
    shape = chunk.task.shape
    return (chunk.stop - chunk.start, *shape[1:]) if shape else ()


def _merge_chunk(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: _Chunk, buffers: _Buffers,
                 reads: list, position: int, allow_nonfinite: bool) -> torch.Tensor:
    name = chunk.task.name
    first = readers[plan.active[0]] if plan.active else readers[plan.newest]
    device = first.get_rows(name, chunk.start, chunk.stop).device  # a view: free to get twice
    acc = buffers.get(plan.accum_dtype, _chunk_shape(chunk), device)
    acc.zero_()
    for offset, i in enumerate(plan.active):
        _prefetch(readers, reads, position + offset + 1)
        acc.add_(readers[i].get_rows(name, chunk.start, chunk.stop), alpha=plan.coeffs[i])
    if not allow_nonfinite and not _all_finite(acc):
        _raise_nonfinite(plan, readers, chunk)
    if chunk.task.out_dtype == plan.accum_dtype:
        return acc
    out = buffers.get(chunk.task.out_dtype, acc.shape, acc.device)
    out.copy_(acc)
    if not allow_nonfinite:
        check_cast_finite(chunk.task.name, out)
    return out


def check_cast_finite(name: str, out: torch.Tensor) -> None:
    """After the cast to the output dtype: a finite fp32 value can still overflow (float16 tops out at 65504)."""
    if out.is_floating_point() and not _all_finite(out):
        raise NonFiniteTensorError(f"tensor {name!r}: the merged value overflows the output dtype {out.dtype} "
                                   f"(finite in the accumulator, Inf after the cast); nothing was written. "
                                   f"Choose a wider --dtype (bfloat16 or float32), or pass --allow-nonfinite.")


def _all_finite(acc: torch.Tensor) -> bool:
    """Exact NaN/Inf test without a full-size temporary: a finite sum implies finite elements;
    a non-finite sum (rare) is confirmed slice by slice, since finite values can overflow a sum."""
    if bool(torch.isfinite(acc.sum())):
        return True
    flat = acc.reshape(-1)
    step = 1 << 20
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def _prefetch(readers: Sequence[CheckpointReader], reads: list, index: int) -> None:
    if index < len(reads):
        chunk, i = reads[index]
        readers[i].prefetch(chunk.task.name, chunk.start, chunk.stop)


def _copy_chunk(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: _Chunk, stats: EngineStats) -> torch.Tensor:
    name = chunk.task.name
    newest = readers[plan.newest].get(name)
    differing = [readers[i].path.name for i in range(len(readers) - 1) if not torch.equal(readers[i].get(name), newest)]
    if differing:
        stats.differing_buffers.append(name)
        warnings.warn(f"non-float tensor {name!r} differs across inputs ({', '.join(differing)} vs the newest "
                      f"{readers[plan.newest].path.name}); copying the newest checkpoint's value", stacklevel=2)
    return newest


def _raise_nonfinite(plan: MergePlan, readers: Sequence[CheckpointReader], chunk: _Chunk) -> None:
    name = chunk.task.name
    for i in plan.active:
        if not bool(torch.isfinite(readers[i].get_rows(name, chunk.start, chunk.stop)).all()):
            raise NonFiniteTensorError(
                f"{readers[i].path}: tensor {name!r} contains NaN or Inf; nothing was written. "
                f"Drop this checkpoint from the window, or pass --allow-nonfinite to merge it anyway.")
    raise NonFiniteTensorError(f"tensor {name!r}: the merged value overflows {plan.accum_dtype}; nothing was written. "
                               f"Use --accum-dtype float64, or --allow-nonfinite to keep it.")
