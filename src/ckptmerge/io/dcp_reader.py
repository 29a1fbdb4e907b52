"""``torch.distributed.checkpoint`` (DCP) folders: model tensors only, no process group needed.

torch writes DCP's ``.metadata`` as a plain pickle. ckptmerge never hands that to
``pickle.load``: a restricted unpickler admits only the DCP metadata classes and torch
dtypes / sizes, so a tampered file fails instead of running code. Tensor chunks are then read
straight from the ``.distcp`` files with ``torch.load(weights_only=True)`` and stitched
together by their offsets. Optimizer, scheduler, RNG and other non-model entries are skipped
(``skipped_keys`` lists them); a leading ``model.`` prefix and wrapper prefixes (io/wrapper_names.py)
are stripped.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError, CkptMergeError, UnsafeCheckpointError
from ckptmerge.io.dcp_checks import checked_metadata, checked_storage, checked_tensor_info, chunk_view
from ckptmerge.io.safe_pickle import loads_restricted
from ckptmerge.io.tensor_info import TensorInfo
from ckptmerge.io.wrapper_names import unwrap_names

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


_EXTRA_GLOBALS = {module: frozenset(names) for module, names in _ALLOWED_GLOBALS.items()}


def load_dcp_metadata(folder: Path) -> object:
    """Parse ``folder/.metadata`` with the restricted unpickler (io/safe_pickle.py).

    The DCP metadata classes are real; any other class (Megatron's ``SavePlan`` in
    ``planner_data``, OLMo-core's storage-info dataclass) is an inert placeholder whose fields
    stay readable.
    """

    path = folder / METADATA_FILE
    return parse_dcp_metadata(path, path.read_bytes())


def parse_dcp_metadata(path, data: bytes) -> object:
    """``load_dcp_metadata`` on bytes already read (``path`` names them: a local path or a URL)."""
    try:
        meta = loads_restricted(data, extra_globals=_EXTRA_GLOBALS)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refusing to load DCP metadata: {str(exc)[:300]}. Nothing from it was "
                                    f"executed. Fix: only merge DCP checkpoints written by torch.distributed.checkpoint.") from exc
    except (CkptMergeError, OSError):
        raise
    except Exception as exc:  # a malformed pickle stream fails in many ways (ValueError, TypeError, EOFError, ...)
        raise CheckpointFormatError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"the file is corrupt or truncated. Re-save the checkpoint.") from exc
    return checked_metadata(path, meta)


def _is_model_key(fqn: str) -> bool:
    if "_extra_state" in fqn:  # Transformer Engine / Megatron per-module state, not a weight
        return False
    head = fqn.split(".", 1)[0]
    return not any(head == p or head.startswith(p + "_") for p in NON_MODEL_PREFIXES)


def default_model_names(folder: Path, fqns: list[str]) -> dict[str, str]:
    """Model name -> DCP key: a ``model.`` shared by every key and wrapper prefixes removed."""
    prefix = "model." if all(fqn.startswith("model.") for fqn in fqns) else ""
    stored = {fqn[len(prefix):]: fqn for fqn in fqns}
    return {clean: stored[short] for clean, short in unwrap_names(folder, stored).items()}


class DcpReader:
    """Model tensors of a DCP folder (all chunks of every rank), assembled lazily one tensor at a time.

    Keys, dtypes and shapes come from the metadata alone; ``get`` reads a tensor's chunks and keeps
    only the most recent tensor, so row-sliced reads of a large tensor do not re-read it and memory
    stays at one tensor whatever the model size. DCP cannot express tied storage: no aliases.
    """

    layout = "dcp"

    def __init__(self, folder: Path, *, display_path: Path | None = None,
                 names: Callable[[Path, list[str]], dict[str, str]] = default_model_names):
        """``names``: the model's name for each model key (a trainer layout passes its own rule)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = folder
        self.display_path = display_path or folder
        meta = self._load_metadata()
        entries = {fqn: md for fqn, md in meta.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
        self.skipped_keys = sorted(fqn for fqn in meta.state_dict_metadata if fqn not in entries or not _is_model_key(fqn))
        model = {fqn: md for fqn, md in entries.items() if _is_model_key(fqn)}
        if not model:
            raise CheckpointFormatError(f"{folder}: DCP checkpoint has no model tensors (skipped: {self.skipped_keys[:8]})")
        self._fqn = names(folder, list(model))
        meta_path = folder / METADATA_FILE
        self._infos = {name: checked_tensor_info(meta_path, fqn, model[fqn]) for name, fqn in self._fqn.items()}
        self._chunks: dict[str, list] = {}
        for index, sinfo in (meta.storage_data or {}).items():
            fqn, offsets, file, start, length = self._checked_storage(meta_path, index, sinfo)
            self._chunks.setdefault(fqn, []).append((offsets, file, start, length, sinfo))
        self._cached: tuple[str, torch.Tensor] | None = None

    # where the bytes come from: local files here; io/remote_dcp.py reads the same from a URL by range requests
    def _load_metadata(self) -> object:
        return load_dcp_metadata(self.path)

    def _checked_storage(self, meta_path, index: object, sinfo: object):
        return checked_storage(self.path, meta_path, index, sinfo)

    def _read_range(self, file, start: int, length: int) -> bytes:
        with open(file, "rb") as f:
            f.seek(start)
            return f.read(length)

    def keys(self) -> list[str]:
        return list(self._infos)

    def fqn(self, name: str) -> str:
        """The DCP key a tensor name stands for (``model.`` put back when it was stripped)."""
        return self._fqn[name]

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

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
        covered, placed = 0, []
        for offsets, file, start, length, sinfo in self._chunks.get(fqn, []):
            if getattr(sinfo, "transform_descriptors", None):
                raise CheckpointFormatError(f"{self.path}: tensor {fqn!r} is stored with transforms "
                                            f"{str(sinfo.transform_descriptors)[:200]} (compression?), which ckptmerge cannot read yet")
            chunk = _load_chunk(file, fqn, start, length, self._read_range)
            chunk_view(file, fqn, full, offsets, chunk, placed).copy_(chunk)
            covered += chunk.numel()
        if covered != info.numel:
            raise CheckpointFormatError(f"{self.path}: tensor {fqn!r} chunks cover {covered} of {info.numel} elements; "
                                        f"the checkpoint is incomplete (a rank's .distcp file missing?)")
        return full


def _load_chunk(file: Path, fqn: str, start: int, length: int, read: Callable[[Path, int, int], bytes]) -> object:
    """One chunk (``read`` brings its bytes), unpickled with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        data = read(file, start, length)
        with warnings.catch_warnings():
            # torch warns about a non-default pickle protocol before refusing a hostile chunk: noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CkptMergeError:  # a remote read's one line (io/remote.py)
        raise
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{file}: refusing to load the chunk of tensor {fqn!r}: it needs arbitrary "
                                    f"unpickling ({str(exc).splitlines()[0][:200]}). Nothing from it was executed. "
                                    f"Fix: only merge DCP checkpoints written by torch.distributed.checkpoint.") from exc
    except OSError as exc:
        raise CheckpointFormatError(f"{file}: cannot read the chunk of tensor {fqn!r} ({exc.strerror}); "
                                    f"a rank's .distcp file is missing or unreadable") from exc
    except Exception as exc:  # truncated or corrupt chunk: RuntimeError, EOFError, ValueError, ...
        raise CheckpointFormatError(f"{file}: cannot read the chunk of tensor {fqn!r} ({type(exc).__name__}: "
                                    f"{str(exc)[:200]}); the file is corrupt or truncated. Re-save the checkpoint.") from exc
