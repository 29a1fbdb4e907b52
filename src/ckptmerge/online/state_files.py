"""An averager's resume state beside a training checkpoint: one file for a whole average, one per rank for shards.

    save_state(avg, "ckpt/step-600")     # every rank calls it; writes averager_state.pt (rank 0) or
                                         # averager_state.rank{r}-of-{w}.pt (each rank its FSDP2 shards)
    load_state(avg, "ckpt/step-600")     # every rank reads the file it needs; False when there is none

A whole average (one process, DDP) is the same on every rank, so rank 0 writes it and any world size can
resume it. A sharded one is refused, with the fix, by a run of another world size. Files are written to a
temporary name and renamed, so a kill never leaves a truncated state file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ckptmerge.errors import ShardLayoutError
from ckptmerge.online.sharding import process_group

STEM = "averager_state"


def state_path(folder: str | Path, sharded: bool, *, stem: str = STEM) -> Path:
    """Where this process's state goes: ``stem.pt`` for a whole average, ``stem.rank{r}-of-{w}.pt`` for shards."""
    rank, world = process_group()
    return Path(folder) / (f"{stem}.rank{rank}-of-{world}.pt" if sharded else f"{stem}.pt")


def save_state(averager, folder: str | Path, *, stem: str = STEM) -> Path | None:
    """Write this process's part of ``averager``'s state into ``folder``; returns the file (None if rank > 0 of a whole one)."""
    path = state_path(folder, averager.is_sharded, stem=stem)
    if not averager.is_sharded and process_group()[0] != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(averager.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state(averager, folder: str | Path, *, stem: str = STEM) -> bool:
    """Load the state this process needs from ``folder``; False when ``folder`` holds no averager state."""
    folder = Path(folder)
    for path in (state_path(folder, True, stem=stem), state_path(folder, False, stem=stem)):
        if path.is_file():
            averager.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return True
    others = sorted(p.name for p in folder.glob(f"{stem}.rank*-of-*.pt"))
    if others:
        rank, world = process_group()
        raise ShardLayoutError(f"{folder}: averager state is sharded ({', '.join(others[:4])}) but holds no file for rank "
                               f"{rank} of {world}. Fix: resume with the world size that saved it; resharding an "
                               f"average is not supported.")
    return False


def gathered_state(averager) -> dict:
    """The state for a checkpoint that rank 0 writes alone (Lightning's): a whole average as is; FSDP2 shards
    gathered from every rank to rank 0 as ``{"per_rank": [...]}`` (a collective: every rank must call it)."""
    if not averager.is_sharded:
        return averager.state_dict()
    import torch.distributed as dist

    rank, world = process_group()
    states = [None] * world if rank == 0 else None
    dist.gather_object(averager.state_dict(), states, dst=0)
    return {"per_rank": states}


def load_gathered_state(averager, state: dict, what: str = "checkpoint") -> None:
    """Load what ``gathered_state`` wrote: this rank's shards of a sharded average, or the whole average."""
    if "per_rank" in state:
        rank, world = process_group()
        if len(state["per_rank"]) != world:
            raise ShardLayoutError(f"{what}: the averager state holds the FSDP2 shards of {len(state['per_rank'])} ranks, "
                                   f"but this run has {world}. Fix: resume with the world size that saved it; "
                                   f"resharding an average is not supported.")
        state = state["per_rank"][rank]
    averager.load_state_dict(state)
