"""TensorInfo and the CheckpointReader protocol that every reader implements."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch only in annotations: readers are described without importing it
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """dtype and shape of one stored tensor, known without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class FileRange:
    """Where some bytes of a checkpoint lie: ``nbytes`` bytes at ``offset`` in the file ``path``."""

    path: Path
    offset: int
    nbytes: int


class CheckpointReader(Protocol):
    """What the merge engine needs from a checkpoint, whatever its format.

    Tensors returned by ``get`` / ``get_rows`` may be views of shared or mapped memory:
    callers must treat them as read-only.
    """

    path: Path
    layout: str

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def file_range(self, name: str, start: int, stop: int) -> FileRange | None:
        """Where rows ``[start, stop)`` of ``name`` lie on disk, as raw little-endian bytes in row-major
        order, so that a merge can read them itself (in large requests, ahead of use, into its own
        buffers); None when they are not one plain byte range of a file."""
        ...

    def aliases(self) -> dict[str, str]:
        """Tied tensors: alias name -> the canonical name it shares storage with."""
        ...

    def metadata(self) -> dict[str, str]: ...

    def close(self) -> None: ...
