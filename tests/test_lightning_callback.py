"""The Lightning callback: same EMA as a hand-computed one, averaged weights during validation only."""

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from ckptmerge.online import EMA  # noqa: E402
from ckptmerge.online.lightning_callback import AveragingCallback  # noqa: E402


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.seen_in_validation = []
        self.after_steps = []

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_steps.append(self.net.weight.detach().double().clone())

    def validation_step(self, batch, _):
        self.seen_in_validation.append(self.net.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def test_lightning_callback_averages_and_swaps_for_validation(tmp_path):
    torch.manual_seed(0)
    module, callback = Regressor(), AveragingCallback(EMA(0.5))
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        accelerator="cpu", enable_model_summary=False)
    trainer.fit(module, loader(), loader())
    expected = None
    for w in module.after_steps:
        expected = w if expected is None else 0.5 * expected + 0.5 * w
    got = callback.averager.averaged_state_dict()["net.weight"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    # validation at the end of epoch 2 saw the averaged weights; training weights were restored after
    torch.testing.assert_close(module.seen_in_validation[-1], got)
    torch.testing.assert_close(module.net.weight.detach().double(), module.after_steps[-1])
    state = {}
    callback.on_save_checkpoint(trainer, module, state)
    fresh = AveragingCallback(EMA(0.5))
    fresh.on_load_checkpoint(trainer, module, state)
    torch.testing.assert_close(fresh.averager.averaged_state_dict()["net.weight"], got)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_callback_on_two_ranks_averages_saves_one_model_and_reloads(tmp_path, strategy):
    import socket

    import lightning_ddp_runs as runs
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(runs.worker, args=(2, port, str(tmp_path), strategy), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{strategy}-rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["after_steps"]) == 4  # 2 epochs of 16 samples per rank
    assert ranks[0]["sharded"] == (strategy == "fsdp2")
    expected = None
    for weights in ranks[0]["after_steps"]:
        expected = weights if expected is None else {k: 0.5 * expected[k] + 0.5 * weights[k] for k in weights}
    saved = load_file(tmp_path / f"{strategy}-avg" / "model.safetensors")  # one model, whatever the sharding
    for name, want in expected.items():
        torch.testing.assert_close(saved[name].double(), want, rtol=0, atol=1e-6, msg=name)
    for seen in ranks:  # each rank got its own average (its shards under FSDP2) back from the checkpoint
        for name, value in seen["averaged"].items():
            assert torch.equal(seen["reloaded"][name], value), name
