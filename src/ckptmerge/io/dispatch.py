"""Which reader opens a checkpoint: a trainer's own layout (``io/layouts/``) first, then the plain
formats (``io/layout.py``: HF folders, safetensors / torch files, DCP folders)."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layout import open_plain_checkpoint
from ckptmerge.io.layouts import open_framework_checkpoint
from ckptmerge.io.remote import Url, as_location, is_url
from ckptmerge.io.tensor_info import CheckpointReader


def open_checkpoint(path: str | Path | Url) -> CheckpointReader:
    """Open any supported checkpoint for reading. Raises CheckpointFormatError naming the fix.

    A trainer's own layout (io/layouts/: Lightning, DeepSpeed, Megatron, ...) is tried first.
    """
    if is_url(path):  # s3://, gs://, ...: read by byte ranges (io/remote_layout.py)
        from ckptmerge.io.remote_layout import open_remote_checkpoint

        return open_remote_checkpoint(as_location(path))
    reader = open_framework_checkpoint(Path(path))
    return reader if reader is not None else open_plain_checkpoint(path)
