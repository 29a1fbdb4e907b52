"""``torch.distributed.checkpoint`` (DCP) folders: model tensors only, no process group needed.

torch writes DCP's ``.metadata`` as a plain pickle. ckptmerge never hands that to
``pickle.load``: a restricted unpickler admits only the DCP metadata classes and torch
dtypes / sizes, so a tampered file fails instead of running code. Tensor chunks are then read
straight from the ``.distcp`` files with ``torch.load(weights_only=True)`` and stitched
together by their offsets. Optimizer, scheduler, RNG and other non-model entries are skipped
(``skipped_keys`` lists them); a leading ``model.`` prefix is stripped.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmerge.io.tensor_info import TensorInfo

METADATA_FILE = ".metadata"
NON_MODEL_PREFIXES = ("optimizer", "optim", "lr_scheduler", "scheduler", "dataloader", "train_state",
                      "rng", "extra_state", "trainer")

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch": {"Size", "strided", "contiguous_format", "channels_last", "preserve_format"},
    "torch.serialization": {"_get_layout"},  # looks a torch.layout up by name
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if name in _ALLOWED_GLOBALS.get(module, ()) or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def load_dcp_metadata(folder: Path) -> object:
    """Parse ``folder/.metadata`` with the restricted unpickler."""
    path = folder / METADATA_FILE
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refusing to load DCP metadata: {exc}. Nothing from it was executed. "
                                    f"Fix: only merge DCP checkpoints written by torch.distributed.checkpoint.") from exc
    except (EOFError, OSError, AttributeError, ImportError) as exc:
        raise CheckpointFormatError(f"{path}: unreadable DCP metadata ({exc})") from exc


def _is_model_key(fqn: str) -> bool:
    head = fqn.split(".", 1)[0]
    return not any(head == p or head.startswith(p + "_") for p in NON_MODEL_PREFIXES)


class DcpReader:
    """Model tensors of a DCP folder (all chunks of every rank), assembled lazily one tensor at a time.

    Keys, dtypes and shapes come from the metadata alone; ``get`` reads a tensor's chunks and keeps
    only the most recent tensor, so row-sliced reads of a large tensor do not re-read it and memory
    stays at one tensor whatever the model size. DCP cannot express tied storage: no aliases.
    """

    layout = "dcp"

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = folder
        meta = load_dcp_metadata(folder)
        entries = {fqn: md for fqn, md in meta.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
        self.skipped_keys = sorted(fqn for fqn in meta.state_dict_metadata if fqn not in entries or not _is_model_key(fqn))
        model = {fqn: md for fqn, md in entries.items() if _is_model_key(fqn)}
        if not model:
            raise CheckpointFormatError(f"{folder}: DCP checkpoint has no model tensors (skipped: {self.skipped_keys[:8]})")
        prefix = "model." if all(fqn.startswith("model.") for fqn in model) else ""
        self._fqn = {fqn[len(prefix):]: fqn for fqn in model}
        self._meta = {name: model[fqn] for name, fqn in self._fqn.items()}
        self._chunks: dict[str, list] = {}
        for index, sinfo in (meta.storage_data or {}).items():
            self._chunks.setdefault(index.fqn, []).append((index, sinfo))
        self._cached: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self._meta)

    def info(self, name: str) -> TensorInfo:
        md = self._meta[name]
        return TensorInfo(dtype=md.properties.dtype, shape=tuple(md.size))

    def get(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # free the previous tensor before reading the next
            self._cached = (name, self._assemble(name))
        return self._cached[1]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.get(name)
        return t if t.dim() == 0 else t[start:stop]

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None  # tensors are served from memory (or assembled from chunks): read them with get_rows

    def aliases(self) -> dict[str, str]:
        return {}

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._cached = None

    def _assemble(self, name: str) -> torch.Tensor:
        fqn, info = self._fqn[name], self.info(name)
        full = torch.empty(info.shape, dtype=info.dtype)
        covered = 0
        for index, sinfo in self._chunks.get(fqn, []):
            if getattr(sinfo, "transform_descriptors", None):
                raise CheckpointFormatError(f"{self.path}: tensor {fqn!r} is stored with transforms "
                                            f"{sinfo.transform_descriptors} (compression?), which ckptmerge cannot read yet")
            try:
                with open(self.path / sinfo.relative_path, "rb") as f:
                    f.seek(sinfo.offset)
                    chunk = torch.load(io.BytesIO(f.read(sinfo.length)), map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError) as exc:
                raise CheckpointFormatError(f"{self.path / sinfo.relative_path}: cannot read tensor {fqn!r} ({exc})") from exc
            view = full
            offsets = tuple(index.offset) if index.offset is not None else (0,) * full.dim()
            for dim, (begin, length) in enumerate(zip(offsets, chunk.shape)):
                view = view.narrow(dim, begin, length)
            view.copy_(chunk)
            covered += chunk.numel()
        if covered != info.numel:
            raise CheckpointFormatError(f"{self.path}: tensor {fqn!r} chunks cover {covered} of {info.numel} elements; "
                                        f"the checkpoint is incomplete (a rank's .distcp file missing?)")
        return full
