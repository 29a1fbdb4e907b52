"""The tensor index of a set of safetensors files, shared by the local (mmap) and the remote (byte-range) reader.

Each file's parsed header adds its tensors with their absolute byte offsets; a name in two files is an error.
The readers add how bytes are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.safetensors_header import checked_entries, checked_metadata
from ckptmerge.io.tensor_info import TensorInfo


@dataclass(frozen=True)
class IndexEntry:
    file_index: int
    info: TensorInfo
    begin: int  # absolute byte offset of the tensor in its file

    @property
    def row_bytes(self) -> int:
        shape = self.info.shape
        return self.info.nbytes // shape[0] if shape and shape[0] else self.info.nbytes


class SafetensorsIndex:
    """``keys`` / ``info`` / ``aliases`` / ``metadata`` of a checkpoint reader over safetensors files."""

    def __init__(self) -> None:
        self._entries: dict[str, IndexEntry] = {}
        self._metadata: dict[str, str] = {}

    def _add_file(self, index: int, where, header: dict, data_start: int, data_bytes: int, file_name) -> None:
        """Index one file's ``header`` (``where`` names it in errors; ``file_name(i)`` names file i)."""
        self._metadata.update(checked_metadata(where, header))
        for name, (dtype, shape, begin) in checked_entries(where, header, data_bytes).items():
            if name in self._entries:
                other = file_name(self._entries[name].file_index)
                raise CheckpointFormatError(f"{where}: tensor {name!r} also appears in {other}")
            self._entries[name] = IndexEntry(index, TensorInfo(dtype=dtype, shape=shape), data_start + begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name].info

    def aliases(self) -> dict[str, str]:
        return {}  # the format cannot store shared tensors

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)
