"""Lightning fits on 2 gloo ranks (CPU) with the averaging callback, for ``test_lightning_callback.py``.

``strategy``: "ddp", or "fsdp2" (``ModelParallelStrategy``, the module shards itself with ``fully_shard``).
Every rank records the full weights after each optimizer step (the reference EMA is folded from them by
hand in the test), saves a Lightning checkpoint and the averaged model, and reloads the checkpoint's averager
state into a fresh callback. What each rank saw is written to ``OUT/{strategy}-rank{r}.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
import torch

from ckptmerge.online import EMA
from ckptmerge.online.lightning_callback import AveragingCallback

DECAY = 0.5


class Regressor(L.LightningModule):
    def __init__(self, shard: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.shard, self.after_steps = shard, []

    def configure_model(self):
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        full = {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().clone()
                for k, p in self.named_parameters()}
        self.after_steps.append(full)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def worker(rank: int, world: int, port: int, out: str, strategy: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_RUN_ID": "ckptmerge-test"})  # as under torchrun: Lightning launches nothing
    out_dir = Path(out)
    if strategy == "ddp":
        chosen = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        chosen = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    module, callback = Regressor(shard=strategy != "ddp"), AveragingCallback(EMA(DECAY))
    trainer = L.Trainer(max_epochs=2, devices=world, accelerator="cpu", strategy=chosen, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out_dir)
    trainer.fit(module, loader())
    checkpoint = out_dir / f"{strategy}.ckpt"
    trainer.save_checkpoint(checkpoint)
    callback.averager.save(out_dir / f"{strategy}-avg", module)  # every rank; rank 0 publishes
    saved = torch.load(checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint, weights_only=False)
    fresh = AveragingCallback(EMA(DECAY))
    fresh.on_load_checkpoint(trainer, module, saved)
    torch.save({"world_size": trainer.world_size, "sharded": callback.averager.is_sharded, "after_steps": module.after_steps,
                "averaged": callback.averager.averaged_state_dict(), "reloaded": fresh.averager.averaged_state_dict()},
               out_dir / f"{strategy}-rank{rank}.pt")
    # Lightning leaves the process group up; a rank that exits with gloo's threads still running can die with
    # "terminate called without an active exception" (SIGABRT). Both ranks finish, then take it down.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
