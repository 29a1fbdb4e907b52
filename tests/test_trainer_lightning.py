"""Lightning runs written by ``ModelCheckpoint`` itself: discovered, merged, and handed back to ``Trainer.fit``."""

from __future__ import annotations

import pytest
import torch

from trainer_checks import assert_merge_matches, fp64_mean

pl = pytest.importorskip("lightning.pytorch", reason="lightning is a test extra")


class TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5)}


def _loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(root, max_steps, callbacks=()):
    return pl.Trainer(max_steps=max_steps, default_root_dir=root, callbacks=list(callbacks), logger=False,
                      accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=5, save_top_k=-1,
                                        save_last=True)
    _trainer(root, 20, [ckpt]).fit(TinyModule(), _loader())
    return root / "checkpoints"


def test_lightning_run_merges_with_true_steps(lightning_run, tmp_path):
    files = sorted(lightning_run.glob("epoch=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    states = [TinyModule.load_from_checkpoint(f).model.state_dict() for f in files[-3:]]  # Lightning's own loader
    assert (lightning_run / "last.ckpt").is_file()
    assert_merge_matches(lightning_run, tmp_path / "out", fp64_mean(states), [5, 10, 15, 20], "lightning")


class _WeightsAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.step = trainer.global_step
        self.exp_avg = [s["exp_avg"].clone() for s in trainer.optimizers[0].state_dict()["state"].values()]


def test_lightning_resumes_from_the_merge(lightning_run, tmp_path):
    from trainer_checks import run_cli

    out = tmp_path / "merged"
    code, _ = run_cli("merge", lightning_run, "-o", out, "--last", "3", "--schedule", "sma", "--as-checkpoint", "--quiet")
    assert code == 0
    files = [next(lightning_run.glob(f"epoch=*-step={s}.ckpt")) for s in (10, 15, 20)]
    newest = files[-1]
    handed = out / newest.name
    reference = fp64_mean([TinyModule.load_from_checkpoint(f).model.state_dict() for f in files])
    probe = _WeightsAtStart()
    trainer = _trainer(tmp_path, 25, [probe])
    trainer.fit(TinyModule(), _loader(), ckpt_path=handed)  # Lightning's own resume
    assert probe.step == 20 and trainer.global_step == 25
    for name, want in reference.items():
        torch.testing.assert_close(probe.weights[name].double(), torch.from_numpy(want), rtol=0, atol=1e-5)
    newest_state = torch.load(newest, weights_only=False)["optimizer_states"][0]["state"]
    for got, want in zip(probe.exp_avg, [s["exp_avg"] for s in newest_state.values()]):
        assert torch.equal(got, want)  # the newest checkpoint's optimizer state, unchanged


def test_two_rank_merge_writes_the_same_hand_back(lightning_run, tmp_path):
    """``torchrun --nproc-per-node 2 -m ckptmerge merge ... --as-checkpoint``: the hand-back is written (it was
    silently dropped under torchrun), and Lightning's own loader reads the merged weights from it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "merged2"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ckptmerge", "merge", str(lightning_run), "-o", str(out), "--last", "3",
                           "--schedule", "sma", "--as-checkpoint", "--quiet"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [next(lightning_run.glob(f"epoch=*-step={s}.ckpt")) for s in (10, 15, 20)]
    reference = fp64_mean([TinyModule.load_from_checkpoint(f).model.state_dict() for f in files])
    handed = TinyModule.load_from_checkpoint(out / files[-1].name).model.state_dict()  # Lightning's own loader
    for name, want in reference.items():
        torch.testing.assert_close(handed[name].double(), torch.from_numpy(want), rtol=0, atol=1e-6)
