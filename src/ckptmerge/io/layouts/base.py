"""What every framework layout provides: a detection rule, the true step, and a reader of its weights."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptmerge.io.layout import detect_layout as _local_detect_layout
from ckptmerge.io.layout import open_plain_checkpoint as _local_open_plain
from ckptmerge.io.tensor_info import CheckpointReader

if TYPE_CHECKING:
    import torch

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.


@dataclass(frozen=True)
class StepInfo:
    """The training step (and tokens / lr when the framework records them) of one checkpoint."""

    step: int | None
    tokens_seen: int | None = None
    lr: float | None = None
    source: str = "name"


def _no_pointer(path: Path) -> str | None:
    return None


@dataclass(frozen=True)
class Layout:
    """One framework's run-directory layout.

    Attributes:
        name: shown by ``ckptmerge inspect`` (``lightning``, ``deepspeed``, ...).
        detect: True when a run-directory entry is one checkpoint of this framework.
        read_step: the true training step from the framework's own metadata (name as fallback).
        open: a CheckpointReader over the model weights only.
        pointer: a reason when the entry is a pointer or copy to skip (``latest``, ``last.ckpt``), else None.
        storage: the file format of its weights when the entry itself is not a plain layout (``torch``, ``dcp``).
        write_back: ``(entry, merged, dest)`` writes the merged weights as this framework's checkpoint in
            folder ``dest`` (``merge --as-checkpoint``), the entry's other state copied unchanged; None when
            not supported.
    """

    name: str
    detect: Callable[[Path], bool]
    read_step: Callable[[Path], StepInfo]
    open: Callable[[Path], CheckpointReader]
    pointer: Callable[[Path], str | None] = _no_pointer
    storage: str = "torch"
    write_back: Callable[[Path, dict[str, torch.Tensor], Path], None] | None = None


def step_from_name(path: Path, pattern: str) -> int | None:
    """The first group of ``pattern`` searched in the entry's name, as an int."""
    match = re.search(pattern, path.name)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=4)
def _cached_payload(path: str, mtime_ns: int, size: int) -> object:
    from ckptmerge.io.torch_reader import load_torch_payload

    return load_torch_payload(Path(path))


def payload(path: Path) -> object:
    """A torch file's whole object (restricted unpickler, memory-mapped), cached across detect / step / open."""
    if is_remote(path):
        return path.torch_payload()
    stat = path.stat()
    return _cached_payload(str(path), stat.st_mtime_ns, stat.st_size)


# A run at a URL: discovery hands the layouts a view of one listing (io/remote_path.py) instead of a Path. The
# layouts' rules run on it unchanged; where they open weights or read a torch file, the calls below are the one
# place that sends a remote path to its remote readers (io/remote_layout.py: range reads, or a one-line refusal).

def is_remote(path: object) -> bool:
    return getattr(path, "is_remote", False) is True


def detect_layout(path: Path) -> tuple[str, list] | None:
    """``io.layout.detect_layout`` (HF folder, safetensors / torch file, DCP folder), for a remote path too."""
    return path.plain_layout() if is_remote(path) else _local_detect_layout(path)


def open_plain_checkpoint(path: Path) -> CheckpointReader:
    """``io.layout.open_plain_checkpoint``, for a remote path too."""
    return path.open_plain() if is_remote(path) else _local_open_plain(path)


def dcp_reader(folder: Path, **options) -> CheckpointReader:
    """``DcpReader(folder, display_path=..., names=...)``, by range reads for a remote folder."""
    if is_remote(folder):
        return folder.open_dcp(**options)
    from ckptmerge.io.dcp_reader import DcpReader

    return DcpReader(folder, **options)


def torch_file_reader(files: list[Path], *, display_path: Path) -> CheckpointReader:
    """``TorchFileReader(files, display_path=...)``, for remote files too."""
    if is_remote(display_path):
        return display_path.open_torch_files(files)
    from ckptmerge.io.torch_reader import TorchFileReader

    return TorchFileReader(files, display_path=display_path)


def torch_weights_reader(path: Path, file: Path, weights_of: Callable[[object], dict], framework: str, *,
                         strip_attribute: bool = False, half_to_fp32: bool = False) -> CheckpointReader:
    """A reader over the weights dict ``weights_of(payload)`` of torch file ``file`` (checked against the whole
    payload with ``check_kept_fraction``), named as ``weights_reader`` names them; ``half_to_fp32``: bf16 / fp16
    tensors read as fp32. A file at a URL is read by byte ranges (``remote_torch.open_remote_torch``), never whole."""
    if is_remote(path):
        return path.open_torch_weights(file, weights_of, framework, strip_attribute=strip_attribute,
                                       half_to_fp32=half_to_fp32)
    from ckptmerge.io.torch_reader import check_kept_fraction

    state = payload(file)
    weights = weights_of(state)
    check_kept_fraction(file, weights, state)
    return weights_reader(path, half_to_fp32_copies(weights) if half_to_fp32 else weights, framework,
                          strip_attribute=strip_attribute)


def zero_masters_reader(tag: Path, model_states: Path, *, display_path: Path) -> CheckpointReader:
    """``deepspeed_zero.ZeroMastersReader`` (fp32 masters gathered from every rank's optimizer file); a URL is
    refused in one line (the partitioned optimizer files are not read by range yet)."""
    if is_remote(display_path):
        return display_path.open_zero_masters()
    from ckptmerge.io.deepspeed_zero import ZeroMastersReader

    return ZeroMastersReader(tag, model_states, display_path=display_path)


def half_to_fp32_copies(weights: dict) -> dict:
    """bf16 / fp16 tensors as fp32 copies; tensors that share storage (tied weights) keep sharing it."""
    import torch

    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in weights.items():
        if not (isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)):
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        out[name] = copies.setdefault(key, t.float())
    return out


def as_int(value: object) -> int | None:
    """An int from an int, a 0-dim / 1-element tensor, or a float with no fraction; else None.

    A tensor of a torch file at a URL is a meta tensor (``remote_torch.remote_payload_object``): its value is
    fetched by one small range read (``stored_value``) only when a layout asks for it here."""
    torch = sys.modules.get("torch")  # no value is a tensor before torch is imported
    if torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.device.type == "meta":
            fetch = getattr(value, "stored_value", None)
            value = fetch() if fetch is not None else None
        value = value.item() if value is not None else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def strip_attribute_prefix(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove a wrapper's attribute prefix (``model.``) shared by every name; returns (weights, prefix)."""
    heads = {name.split(".", 1)[0] for name in weights}
    if len(heads) != 1 or any("." not in name for name in weights):
        return weights, ""
    prefix = next(iter(heads)) + "."
    return {name[len(prefix):]: t for name, t in weights.items()}, prefix


def weights_reader(path: Path, weights: dict[str, torch.Tensor], framework: str, *,
                   strip_attribute: bool = False) -> CheckpointReader:
    """A reader over ``weights`` (DDP / compile prefixes stripped, optionally the wrapper's attribute too)."""
    from ckptmerge.io.state_dict_reader import StateDictReader
    from ckptmerge.io.torch_reader import strip_prefixes

    weights = strip_prefixes(path, weights)
    prefix = ""
    if strip_attribute:
        weights, prefix = strip_attribute_prefix(weights)
    return StateDictReader(weights, path, layout="torch", metadata={"framework": framework, "key_prefix": prefix})


WEIGHT_FILE_SUFFIXES = (".safetensors",)
WEIGHT_FILE_NAMES = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                     "merge.json", "ckptmerge.json")


def copy_folder_state(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint folder's non-weight files (optimizer, scheduler, RNG, trainer state) into ``dest``;
    ``skip``: more names of weights to leave out (the layout writes them itself)."""
    import shutil

    for item in src.iterdir():
        if item.name in WEIGHT_FILE_NAMES or item.name in skip or item.suffix in WEIGHT_FILE_SUFFIXES or item.name.startswith("pytorch_model-"):
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        elif not target.exists():
            shutil.copyfile(item, target)


def write_back_torch_file(src: Path, dst: Path, weights_of: Callable[[object], dict], merged: dict[str, torch.Tensor],
                          *, strip_attribute: bool = False) -> None:
    """Copy torch file ``src`` to ``dst`` with the weights dict ``weights_of(payload)`` set to ``merged``.

    Names are matched the way the layout's reader named them (DDP / compile prefixes and, with
    ``strip_attribute``, the wrapper's attribute stripped).
    """
    from ckptmerge.errors import CheckpointFormatError
    from ckptmerge.io.torch_file_rewrite import load_tensor_refs, rewrite_tensors
    from ckptmerge.io.torch_reader import strip_prefixes

    refs = weights_of(load_tensor_refs(src))
    names = strip_prefixes(src, {k: k for k in refs})
    if strip_attribute:
        names, _ = strip_attribute_prefix(names)
    missing = sorted(set(merged) - set(names))
    if missing:
        raise CheckpointFormatError(f"{src}: merged tensors {missing[:8]} have no place in the newest checkpoint")
    rewrite_tensors(src, dst, {refs[names[name]]: merged[name] for name in merged})
