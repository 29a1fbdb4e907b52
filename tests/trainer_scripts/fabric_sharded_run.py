"""Lightning Fabric with ``ModelParallelStrategy`` (FSDP2) on 2 gloo ranks, saving sharded ``fabric.save`` folders.

Usage: python fabric_sharded_run.py RUN_DIR   (starts both ranks itself; writes RUN_DIR/checkpoints/step-{2,4,6,8})
Every rank trains on its own batches; ``fabric.save(path, {"model": model, "optimizer": optimizer, "step": step})``
writes each folder with Fabric's own save code: DCP with ``model.`` and ``optimizer.`` entries, ``meta.pt`` with
``{"step": step}``. (Fabric's ``FSDPStrategy`` is FSDP1, which torch refuses without an accelerator.)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import lightning.fabric as lf
    from lightning.fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_RUN_ID": "ckptmerge-test"})  # as under torchrun: Fabric launches nothing

    def parallelize(model, device_mesh):
        fully_shard(model, mesh=device_mesh["data_parallel"])
        return model

    fabric = lf.Fabric(accelerator="cpu", devices=world, strategy=ModelParallelStrategy(
        parallelize, data_parallel_size=world, tensor_parallel_size=1))
    fabric.launch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.05))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(rank))
    for step in range(1, 9):
        batch = x[(step - 1) * 8:step * 8]
        fabric.backward(torch.nn.functional.mse_loss(model(batch), batch[:, :3].sin()))
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            fabric.save(os.path.join(run_dir, "checkpoints", f"step-{step}"),
                        {"model": model, "optimizer": optimizer, "step": step})
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(os.environ.get("MASTER_PORT", "29690")), sys.argv[1]), nprocs=2)
