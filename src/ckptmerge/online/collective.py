"""One output folder written by every rank together and published by rank 0 alone, atomically.

Rank 0 opens the temporary folder (``io/publish.atomic_folder``) and sends its path to every rank; each rank
writes its part; the ranks agree on the outcome; only then does rank 0 rename the folder into place. A failure
on any rank removes the temporary folder and raises on every rank, so no rank waits forever and no half-written
model is ever published. Without a process group (or with one rank) this is ``atomic_folder`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ckptmerge.errors import CkptMergeError
from ckptmerge.io.publish import atomic_folder
from ckptmerge.online.sharding import process_group


def publish_together(dest: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on every rank (a collective: every rank must call this), then publish ``tmp`` as ``dest``."""
    rank, world = process_group()
    if world == 1:
        with atomic_folder(dest, force=True) as tmp:
            write(tmp)
        return dest
    if rank == 0:
        _publish_on_rank0(dest, write)
        return dest
    tmp = _from_rank0(None, dest)
    _write_and_agree(write, Path(tmp), dest)
    _from_rank0(None, dest)  # rank 0's rename
    return dest


def _publish_on_rank0(dest: Path, write: Callable[[Path], None]) -> None:
    stage = "open"
    try:
        with atomic_folder(dest, force=True) as tmp:
            _from_rank0(("ok", str(tmp)), dest)
            stage = "write"
            _write_and_agree(write, tmp, dest)
            stage = "rename"
        _from_rank0(("ok", None), dest)
    except BaseException as exc:
        if stage != "write":  # the other ranks are waiting for a message from rank 0
            _from_rank0(("error", f"{type(exc).__name__}: {exc}"), dest)
        raise


def _from_rank0(message: tuple[str, str | None] | None, dest: Path) -> str | None:
    """Broadcast rank 0's ``(status, value)``; on the other ranks raise when the status is an error."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error" and message is None:
        raise CkptMergeError(f"{dest}: not written: rank 0 failed ({value})")
    return value


def _write_and_agree(write: Callable[[Path], None], tmp: Path, dest: Path) -> None:
    """Every rank writes its part; when any rank failed, every rank raises (the failing one its own error)."""
    rank, world = process_group()
    error = None
    try:
        write(tmp)
    except Exception as exc:
        error, own = f"rank {rank}: {type(exc).__name__}: {exc}", exc
    errors: list = [None] * world
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if error:
        raise own
    if failed:
        raise CkptMergeError(f"{dest}: not written: {failed[0]}")
