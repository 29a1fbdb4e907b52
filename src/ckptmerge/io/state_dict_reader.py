"""A CheckpointReader over tensors already loaded (or memory-mapped) by torch."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptmerge.io.tensor_info import TensorInfo


def find_aliases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names that are the very same tensor as an earlier name (tied weights): alias -> canonical.

    Two names alias when they share storage, offset, shape and strides. The canonical name is the
    first in the state dict's order (``embed_tokens`` before ``lm_head`` for HF models).
    """
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


class StateDictReader:
    """Serves tensors from a flat ``{name: tensor}`` dict, detecting tied entries."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path, layout: str,
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.layout = layout
        self._aliases = find_aliases(tensors)
        self._tensors = {k: v for k, v in tensors.items() if k not in self._aliases}
        self._metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(dtype=t.dtype, shape=tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._tensors[name]
        return t if t.dim() == 0 else t[start:stop]

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None  # tensors are served from memory (or assembled from chunks): read them with get_rows

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        self._tensors = {}
