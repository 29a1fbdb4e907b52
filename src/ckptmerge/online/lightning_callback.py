"""A Lightning callback that keeps an online average (the optional ``lightning`` extra).

    from ckptmerge.online import EMA
    from ckptmerge.online.lightning_callback import AveragingCallback
    trainer = L.Trainer(callbacks=[AveragingCallback(EMA(half_life=500))])

Follows Lightning's ``WeightAveraging`` contract: the average is updated after every optimizer step,
swapped into the module for validation and swapped back after, stored in Lightning checkpoints (so a
resumed fit continues the same average), and left separate at the end of training (the module keeps
its training weights; ``callback.averager.save(path, module)`` writes the averaged model).

Under DDP every rank updates the same average and rank 0's copy goes into the checkpoint. Under a sharding
strategy (``ModelParallelStrategy``: FSDP2) every rank's shards are gathered to rank 0 into the checkpoint and
each rank takes its own back on resume, on the same world size. ``averager.save`` is then a collective: call it
on every rank. ``FSDPStrategy`` (FSDP1 flat parameters) and DeepSpeed are refused at setup.

A ``PowerEMASnapshots`` averager (``phema``) also writes its snapshot series every ``every`` optimizer steps, each
profile as ``DEFAULT_ROOT_DIR/phema/sigma_rel-0.050-step-000100/`` (``snapshot_dir=`` to put it elsewhere), as
``ckptmerge train --average phema:...`` does; ``ckptmerge merge DIR/phema --schedule phema:sigma_rel=S``.

With ``eval_every=N, data=[...], tokens=T`` (``online/periodic_eval.py``) every N-th optimizer step scores the
training weights and the average on the same held-out windows (the module's ``forward(input_ids)`` must return
logits, a tuple starting with them, or an HF output) and logs ``eval/raw/...`` and ``eval/merged/<kind>/...`` with
``pl_module.log_dict`` from ``on_train_batch_end``: they reach the trainer's loggers and ``callback_metrics``. Lightning
writes step metrics every ``log_every_n_steps``, so ``eval_every`` must be a multiple of it (checked at setup).
"""

from __future__ import annotations

from pathlib import Path

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.online.averager import Averager
from ckptmerge.online.periodic_eval import PeriodicEval
from ckptmerge.online.phema import PowerEMASnapshots
from ckptmerge.online.state_files import gathered_state, load_gathered_state

CHECKPOINT_KEY = "ckptmerge_averager"


class AveragingCallback(pl.Callback):
    def __init__(self, averager: Averager, *, eval_every: int | None = None, data=(), tokens: int = 32768,
                 tokenizer=None, eval_settings: EvalSettings | None = None, snapshot_dir: str | Path | None = None):
        self.averager = averager
        self.snapshot_dir = snapshot_dir  # phema snapshots: default DEFAULT_ROOT_DIR/phema
        self._snapshot_step: int | None = None
        self.evaluation = PeriodicEval.from_options(eval_every, data, tokens, tokenizer, eval_settings)
        self._swap = None
        self._evaluated_step: int | None = None

    def setup(self, trainer, pl_module, stage):
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise ConfigError(f"AveragingCallback: the {name} strategy keeps flattened parameter shards that ckptmerge "
                              f"cannot pair by name. Fix: use strategy='ddp', or ModelParallelStrategy (FSDP2).")
        self._check_eval_interval(trainer.log_every_n_steps)

    def _check_eval_interval(self, written: int) -> None:
        """Lightning writes step metrics every ``written`` steps: an evaluation at any other step would be lost."""
        every = self.evaluation.every if self.evaluation else 0
        if every and (written == 0 or every % written):
            raise ConfigError(f"AveragingCallback(eval_every={every}): Lightning writes step metrics every "
                              f"log_every_n_steps={written} steps, so some evaluations would never reach the "
                              "loggers. Fix: an eval_every that is a multiple of log_every_n_steps, or "
                              "Trainer(log_every_n_steps=1)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.averager.update(pl_module, step)  # repeated steps (accumulation) are ignored
        self._save_snapshots(trainer, step, pl_module)
        if (self.evaluation is not None and self.evaluation.is_due(step) and self.averager.n_averaged
                and step != self._evaluated_step):  # once per optimizer step under gradient accumulation
            self._evaluated_step = step
            metrics = self.evaluation.evaluate(pl_module, {self.averager.kind: self.averager})
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)  # equal on every rank: no sync needed

    def _save_snapshots(self, trainer, step: int, pl_module) -> None:
        """A phema averager's snapshots at a snapshot step, once under gradient accumulation (a collective)."""
        averager = self.averager
        if not isinstance(averager, PowerEMASnapshots) or not averager.snapshot_due(step) or step == self._snapshot_step:
            return
        self._snapshot_step = step
        averager.save_snapshots(Path(self.snapshot_dir or Path(trainer.default_root_dir) / "phema"), pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.averager.n_averaged and not trainer.sanity_checking:
            self._swap = self.averager.swapped(pl_module)
            self._swap.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._swap is not None:
            self._swap.__exit__(None, None, None)
            self._swap = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = gathered_state(self.averager)  # a collective when sharded

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if CHECKPOINT_KEY in checkpoint:
            load_gathered_state(self.averager, checkpoint[CHECKPOINT_KEY], "Lightning checkpoint")
