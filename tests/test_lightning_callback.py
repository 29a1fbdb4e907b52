"""The Lightning callback: same EMA as a hand-computed one, averaged weights during validation only."""

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from eval_reference import reference_windows, transformers_losses  # noqa: E402

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


class TinyLlama(L.LightningModule):
    """A tiny Llama on random byte ids; forward(input_ids) gives logits, as the periodic evaluation needs."""

    def __init__(self, config):
        super().__init__()
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, _):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


class WeightsAt(L.Callback):
    """Reference: the training weights after each optimizer step (fp64), and a hand-folded fp64 EMA of them."""

    def __init__(self, decay):
        self.decay, self.weights, self.ema = decay, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        current = {k: v.detach().double().clone() for k, v in pl_module.model.state_dict().items()}
        previous = self.ema.get(step - 1)
        self.weights[step] = current
        self.ema[step] = current if previous is None else {
            k: self.decay * previous[k] + (1 - self.decay) * current[k] for k in current}


def test_lightning_callback_logs_periodic_eval_that_csv_logger_writes(tmp_path, monkeypatch):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from ckptmerge.data.tokenizer import save_hf_tokenizer
    from ckptmerge.errors import ConfigError

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    save_hf_tokenizer(tmp_path / "tok")
    g = torch.Generator().manual_seed(7)
    words = ["merge", "average", "weights", "loss", "step", "tokens", "model", "train"]
    held = tmp_path / "held.txt"  # byte tokenizer: its tokens are exactly its bytes
    held.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (200,), generator=g)))
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    ids = torch.randint(0, 256, (16, 16), generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    options = {"max_steps": 4, "enable_checkpointing": False, "enable_progress_bar": False, "accelerator": "cpu",
               "enable_model_summary": False, "default_root_dir": tmp_path}

    def averaging():
        return AveragingCallback(EMA(0.6), eval_every=2, data=[str(held)], tokens=128, tokenizer=str(tmp_path / "tok"))

    with pytest.raises(ConfigError, match="log_every_n_steps"):  # evaluations Lightning would never write
        L.Trainer(callbacks=[averaging()], logger=False, log_every_n_steps=3, **options).fit(TinyLlama(config), train)

    torch.manual_seed(0)
    module, before, after = TinyLlama(config), WeightsAt(0.6), WeightsAt(0.6)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    L.Trainer(callbacks=[before, averaging(), after], logger=logger, log_every_n_steps=2, **options).fit(module, train)

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = f"eval/merged/ema/{held.name}"
    logged = [row for row in rows if row.get(key + "/loss")]
    # Lightning writes a step's metrics at global_step - 1 (its batches-that-stepped count), as for train_loss
    assert [int(row["step"]) for row in logged] == [1, 3] and all(row["train_loss"] for row in logged)
    ids = torch.tensor(list(held.read_bytes()), dtype=torch.int64)
    windows = reference_windows(ids, n_windows=128 // 32, context=32)
    for row, step in zip(logged, [2, 4]):
        raw = transformers_losses(config, before.weights[step], windows)
        merged = transformers_losses(config, before.ema[step], windows)
        assert abs(float(row[f"eval/raw/{held.name}/loss"]) - raw.mean()) < 1e-5
        assert abs(float(row[key + "/loss"]) - merged.mean()) < 1e-5
        assert abs(float(row[key + "/delta_vs_raw"]) - (merged - raw).mean()) < 1e-5
        assert float(row[key + "/delta_vs_raw"]) != 0
        for name, value in before.weights[step].items():  # the training weights came back after the swap
            assert torch.equal(after.weights[step][name], value), name
