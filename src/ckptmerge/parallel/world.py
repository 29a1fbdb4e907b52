"""The process group: torchrun (or srun running torchrun) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR.

Without those variables everything here is a no-op for a single process, so library code calls
``rank()``, ``broadcast`` and ``all_gather`` unconditionally. The CPU path uses gloo; with CUDA each
rank takes the device ``LOCAL_RANK`` and the group uses nccl.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch


def world_size() -> int:
    """Ranks in the job: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init() -> None:
    """Join the process group torchrun described (once); nothing for a single process."""
    import torch.distributed as dist

    if not is_distributed() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend())
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (pickled between our own ranks only)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    init()
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    init()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        init()
        dist.barrier()


def _object_device() -> torch.device | None:
    return local_device() if backend() == "nccl" else None
