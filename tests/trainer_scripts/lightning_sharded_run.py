"""Lightning ``ModelParallelStrategy`` (FSDP2) on 2 gloo ranks, saving sharded ``epoch=E-step=S.ckpt/`` folders.

Usage: python lightning_sharded_run.py RUN_DIR   (starts both ranks itself; writes RUN_DIR/checkpoints)
Every rank trains on its own batches; ``ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)`` writes the
checkpoints with Lightning's own save code (DCP plus ``meta.pt``).
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as L
import torch
import torch.multiprocessing as mp


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.model)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def loader(rank: int):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(rank))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].sin()), batch_size=8)


def worker(rank: int, world: int, port: int, run_dir: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_RUN_ID": "ckptmerge-test"})  # as under torchrun: Lightning launches nothing
    checkpoints = ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=8, devices=world, accelerator="cpu", logger=False, callbacks=[checkpoints],
                        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(Regressor(), loader(rank))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(os.environ.get("MASTER_PORT", "29620")), sys.argv[1]), nprocs=2)
