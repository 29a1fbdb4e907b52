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
from ckptmerge.io.state_dict_reader import StateDictReader

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


class DcpReader(StateDictReader):
    """Loads the model tensors of a DCP folder (all chunks of every rank) into memory."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = load_dcp_metadata(folder)
        entries = {fqn: md for fqn, md in meta.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
        self.skipped_keys = sorted(fqn for fqn in meta.state_dict_metadata if fqn not in entries or not _is_model_key(fqn))
        model = {fqn: md for fqn, md in entries.items() if _is_model_key(fqn)}
        if not model:
            raise CheckpointFormatError(f"{folder}: DCP checkpoint has no model tensors (skipped: {self.skipped_keys[:8]})")
        strip = all(fqn.startswith("model.") for fqn in model)
        storage = meta.storage_data or {}
        tensors = {(fqn[len("model."):] if strip else fqn): self._assemble(folder, fqn, md, storage)
                   for fqn, md in model.items()}
        super().__init__(tensors, folder, layout="dcp")

    @staticmethod
    def _assemble(folder: Path, fqn: str, md: object, storage: dict) -> torch.Tensor:
        full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for index, sinfo in storage.items():
            if index.fqn != fqn:
                continue
            if getattr(sinfo, "transform_descriptors", None):
                raise CheckpointFormatError(f"{folder}: tensor {fqn!r} is stored with transforms "
                                            f"{sinfo.transform_descriptors} (compression?), which ckptmerge cannot read yet")
            with open(folder / sinfo.relative_path, "rb") as f:
                f.seek(sinfo.offset)
                chunk = torch.load(io.BytesIO(f.read(sinfo.length)), map_location="cpu", weights_only=True)
            offsets = tuple(index.offset) if index.offset is not None else (0,) * full.dim()
            view = full
            for dim, (start, length) in enumerate(zip(offsets, chunk.shape)):
                view = view.narrow(dim, start, length)
            view.copy_(chunk)
        return full
