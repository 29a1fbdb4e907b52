"""Where a merge accumulates: the CPU, or an accelerator (``cuda``, ...) fed from the host.

A ``Stage`` owns the merge's scratch tensors, reused from tensor to tensor so pages are faulted in
once: the accumulator on the compute device, and, when that is not where the inputs live, a
page-locked host buffer for the results. Host slices go in with asynchronous copies; a fence
recorded after each copy tells the read-ahead thread when it may refill that host buffer. On the CPU
every step is a plain synchronous tensor operation, so the same code runs (and is tested) there,
and large element-wise steps are split across the cores (``ckptmerge.merging.cpu_threads``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ckptmerge.errors import ConfigError
from ckptmerge.io.tensor_info import CheckpointReader
from ckptmerge.merging.cpu_threads import CpuThreads
from ckptmerge.parallel.world import local_device


def resolve_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)``, or a ConfigError naming the fix when no such device is usable here."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device name ({exc}); use cpu or cuda") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return local_device()  # under torchrun, each rank accumulates on its own GPU
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        raise ConfigError(f"device: {name!r} is not available on this machine (torch {torch.__version__} sees no "
                          f"{device.type} device); merge with --device cpu")
    return device


def input_device(plan, readers: Sequence[CheckpointReader]) -> torch.device:
    """Where the inputs live: the CPU for files, else the device of the in-memory tensors."""
    for task in plan.tasks:
        if task.merged and plan.active:
            reader = readers[plan.active[0]]
            if reader.file_range(task.name, 0, 0) is not None:
                return torch.device("cpu")
            return reader.get_rows(task.name, 0, 0).device
    return torch.device("cpu")


class Stage:
    """Scratch tensors and transfers for accumulating on ``device`` inputs that live on ``home``."""

    def __init__(self, device: torch.device, home: torch.device, threads: int | None = None, buffers: int = 1):
        self.device, self.home = device, home
        self.uses_accelerator = device.type != "cpu" and home.type == "cpu"
        self._flat: dict[tuple, torch.Tensor] = {}
        self._cpu = CpuThreads(threads if device.type == "cpu" else 1)
        self._buffers, self._parity = max(1, buffers), 0

    def flip(self) -> None:
        """Use the next set of scratch tensors (with ``buffers=2``, the last chunk may still be being written)."""
        self._parity = (self._parity + 1) % self._buffers

    def __enter__(self) -> "Stage":
        self._cpu.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cpu.__exit__(*exc)

    def add(self, target: torch.Tensor, part: torch.Tensor, alpha: float) -> None:
        """``target += alpha * part`` (``part`` has target's shape or its number of elements)."""
        part = self.upload(part)
        if part.is_contiguous() and target.is_contiguous():
            self._cpu.map(lambda t, p: t.add_(p, alpha=alpha), target.view(-1), part.view(-1))
        else:
            target.add_(part.view(target.shape), alpha=alpha)

    def cast(self, acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``acc`` in ``dtype``, in a reused buffer (``acc`` itself when it already has that dtype)."""
        if acc.dtype == dtype:
            return acc
        out = self._get(dtype, tuple(acc.shape), self.device, pinned=False, slot="out")
        self._cpu.map(lambda o, a: o.copy_(a), out.view(-1), acc.view(-1))
        return out

    def all_finite(self, acc: torch.Tensor) -> bool:
        """Exact NaN/Inf test without a full-size temporary: a finite sum implies finite elements;
        a non-finite sum (rare) is confirmed slice by slice, since finite values can overflow a sum."""
        flat = acc.view(-1)
        if all(self._cpu.map(lambda a: bool(torch.isfinite(a.sum())), flat)):
            return True
        step = 1 << 20
        return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))

    def zeros(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The accumulator, zeroed, on the compute device."""
        acc = self._get(dtype, shape, self.device, pinned=False, slot="acc")  # contiguous: a view of a flat buffer
        self._cpu.map(lambda a: a.zero_(), acc.view(-1))
        return acc

    def upload(self, part: torch.Tensor) -> torch.Tensor:
        """``part`` on the compute device; from page-locked memory the copy is asynchronous."""
        return part if part.device == self.device else part.to(self.device, non_blocking=part.is_pinned())

    def fence(self) -> torch.Event | None:
        """Completes when every copy issued so far has finished; None on the CPU (copies are synchronous)."""
        if self.device.type == "cpu":
            return None
        event = torch.Event(device=self.device)
        event.record()
        return event

    def download(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` on the inputs' device, through a reused (page-locked) buffer when it must move."""
        if out.device == self.home:
            return out
        host = self._get(out.dtype, tuple(out.shape), self.home, pinned=self.uses_accelerator, slot="host")
        return host.copy_(out)

    def _get(self, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device, *, pinned: bool,
             slot: str) -> torch.Tensor:
        numel = math.prod(shape)
        key = (slot, self._parity, dtype, device, pinned)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel:
            self._flat.pop(key, None)  # free the smaller one before allocating
            flat = self._flat[key] = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
        return flat[:numel].view(shape)
