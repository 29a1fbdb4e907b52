"""The plain checkpoint formats, whatever trainer wrote them: HF folders, single safetensors / torch files,
DCP folders. ``io/dispatch.py`` tries the trainers' own layouts (``io/layouts/``) before these."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.shard_index import read_shard_index
from ckptmerge.io.tensor_info import CheckpointReader

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def detect_layout(path: Path) -> tuple[str, list[Path]] | None:
    """Return (layout, weight files) when ``path`` is a checkpoint, else None.

    Folder rules, first match wins: ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``, DCP ``.metadata``, then a folder
    holding exactly one ``*.safetensors`` file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix in TORCH_SUFFIXES:
            return "torch", [path]
        return None
    if not path.is_dir():
        return None
    if (path / SAFETENSORS_INDEX).is_file():
        return "safetensors", _shards_from_index(path / SAFETENSORS_INDEX)
    if (path / "model.safetensors").is_file():
        return "safetensors", [path / "model.safetensors"]
    if (path / TORCH_INDEX).is_file():
        return "torch", _shards_from_index(path / TORCH_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return "torch", [path / "pytorch_model.bin"]
    if (path / ".metadata").is_file():
        return "dcp", [path]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return "safetensors", singles
    return None


def _shards_from_index(index_path: Path) -> list[Path]:
    return read_shard_index(index_path)  # validated: strings only, files confined to the folder


def open_plain_checkpoint(path: str | Path) -> CheckpointReader:
    """Open an HF folder, a safetensors / torch file or a DCP folder, whatever trainer wrote it."""
    path = Path(path)
    found = detect_layout(path)
    if found is None:
        raise CheckpointFormatError(
            f"{path}: not a checkpoint ckptmerge can read. Expected an HF folder (model.safetensors[.index.json] "
            f"or pytorch_model.bin[.index.json]), a .safetensors file, a torch file ({', '.join(TORCH_SUFFIXES)}), "
            f"or a torch.distributed.checkpoint folder with a .metadata file.")
    layout, files = found
    if layout == "safetensors":
        from ckptmerge.io.safetensors_reader import SafetensorsReader
        return SafetensorsReader(files, display_path=path)
    if layout == "torch":
        from ckptmerge.io.torch_reader import TorchFileReader
        return TorchFileReader(files, display_path=path)
    from ckptmerge.io.dcp_reader import DcpReader
    return DcpReader(path)
