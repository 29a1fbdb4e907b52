"""Where an averager's tensors live across processes, and the checks that keep a resumed average on them.

A single process and every DDP rank hold the whole model, so the average is one whole copy (the same on
every rank). Under FSDP2 (``fully_shard``) the parameters are DTensors and each rank averages its own
shard: that state is only valid on the same rank of a run with the same world size and the same shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ckptmerge.errors import ShardLayoutError


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer is a DTensor (FSDP2, tensor parallel)."""
    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


def shard_layout(model: torch.nn.Module) -> dict:
    """This process's place in the run and the shape of each local shard (empty when nothing is sharded)."""
    rank, world = process_group()
    shapes = {name: list(t.to_local().shape) for name, t in (*model.named_parameters(), *model.named_buffers())
              if is_dtensor(t)}
    return {"sharded": bool(shapes), "rank": rank, "world_size": world, "local_shapes": shapes}


def check_same_processes(saved: dict | None, what: str) -> None:
    """Refuse sharded state saved by another rank or world size (resharding an average is not supported)."""
    if not saved or not saved["sharded"]:
        return
    rank, world = process_group()
    if (saved["rank"], saved["world_size"]) != (rank, world):
        raise ShardLayoutError(
            f"{what}: holds the FSDP2 shards of rank {saved['rank']} of {saved['world_size']}, but this process is "
            f"rank {rank} of {world}. Fix: resume with the same world size (torchrun --nproc-per-node "
            f"{saved['world_size']}) and give each rank its own state file; resharding an average is not supported.")


def check_same_shards(saved: dict | None, model: torch.nn.Module, what: str) -> None:
    """Refuse sharded state whose local shard shapes differ from the model's (another sharding plan)."""
    if not saved or not saved["sharded"]:
        return
    current = shard_layout(model)["local_shapes"]
    if current != saved["local_shapes"]:
        diff = sorted(k for k in set(current) | set(saved["local_shapes"]) if current.get(k) != saved["local_shapes"].get(k))
        raise ShardLayoutError(
            f"{what}: its FSDP2 shards do not match the model's ({len(diff)} differ, first {diff[0]!r}: saved "
            f"{saved['local_shapes'].get(diff[0])}, model {current.get(diff[0])}). Fix: shard the model exactly as in "
            f"the run that saved the state (same fully_shard calls, same world size).")
