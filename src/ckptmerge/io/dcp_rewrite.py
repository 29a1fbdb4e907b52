"""Write merged tensors into a copy of a ``torch.distributed.checkpoint`` folder; every other entry unchanged.

The copy keeps the newest checkpoint's optimizer, LR-scheduler, dataloader and train-state entries
byte for byte; each model tensor chunk is re-serialised the way torch's ``FileSystemWriter`` writes
it (``torch.save`` of the chunk, in the stored dtype) and the offsets in ``.metadata`` are updated.
Only metadata made of torch's own classes is written back: one that holds placeholders (OLMo-core,
Megatron) is refused.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.dcp_reader import METADATA_FILE, DcpReader, default_model_names, load_dcp_metadata
from ckptmerge.io.safe_pickle import Placeholder


def rewrite_dcp(src: Path, dst: Path, merged: dict[str, torch.Tensor], names=default_model_names) -> None:
    """Copy DCP folder ``src`` to ``dst`` (created) with the model tensors set to ``merged``
    (named as ``names`` named them when the folder was read: see ``DcpReader``)."""
    meta = load_dcp_metadata(src)
    if any(isinstance(v, Placeholder) for v in meta.storage_data.values()):
        raise CheckpointFormatError(f"{src}: its DCP metadata uses another library's classes; writing it back "
                                    f"is only supported for checkpoints written by torch's own FileSystemWriter")
    reader = DcpReader(src, names=names)
    by_fqn = {reader.fqn(name): tensor for name, tensor in merged.items()}
    reader.close()
    dst.mkdir(parents=True)
    files: dict[str, list] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(info.relative_path, []).append((index, info))
    new_storage = {}
    for relative_path, items in files.items():
        if Path(relative_path).name != relative_path or relative_path in ("", ".", ".."):
            raise CheckpointFormatError(f"{src / METADATA_FILE}: data file {relative_path!r} is not a plain file name "
                                        f"in the checkpoint folder; refusing to read or write outside it")
        raw = (src / relative_path).read_bytes()
        out = bytearray()
        for index, info in sorted(items, key=lambda item: item[1].offset):
            chunk = raw[info.offset: info.offset + info.length]
            if index.fqn in by_fqn:
                chunk = _merged_chunk(src, index, info, chunk, by_fqn[index.fqn])
            new_storage[index] = dataclasses.replace(info, offset=len(out), length=len(chunk))
            out += chunk
        (dst / relative_path).write_bytes(bytes(out))
    for item in src.iterdir():
        if item.is_file() and item.name != METADATA_FILE and item.name not in files:
            shutil.copyfile(item, dst / item.name)
    meta.storage_data = new_storage
    (dst / METADATA_FILE).write_bytes(pickle.dumps(meta))


def _merged_chunk(src: Path, index, info, chunk: bytes, full: torch.Tensor) -> bytes:
    if getattr(info, "transform_descriptors", None):
        raise CheckpointFormatError(f"{src}: tensor {index.fqn!r} is stored with transforms; cannot write it back")
    stored = torch.load(io.BytesIO(chunk), map_location="cpu", weights_only=True)
    piece = full
    for dim, (begin, length) in enumerate(zip(index.offset or (0,) * full.dim(), stored.shape)):
        piece = piece.narrow(dim, begin, length)
    buffer = io.BytesIO()
    torch.save(piece.to(stored.dtype).contiguous().clone(), buffer)
    return buffer.getvalue()
