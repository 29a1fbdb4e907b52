"""An HF ``transformers.TrainerCallback`` that keeps an online average while ``Trainer`` trains.

    from ckptmerge.online import EMA
    from ckptmerge.online.hf_callback import AveragingCallback
    trainer = Trainer(..., callbacks=[AveragingCallback(EMA(half_life=500))])

- after every optimizer step (``on_step_end``, once per step under gradient accumulation) the
  averager folds in the model's weights;
- at every save, ``checkpoint-N/averaged/`` holds the averaged model (an HF folder that
  ``ckptmerge eval`` and ``merge`` read; ``save_format="dcp"`` writes a DCP folder instead) and
  ``checkpoint-N/averager_state.pt`` its state;
- a ``PowerEMASnapshots`` averager (``phema``) also writes its snapshot series every ``every`` steps, each profile
  as ``OUTPUT_DIR/phema/sigma_rel-0.050-step-000100/`` with the tokenizer, as ``ckptmerge train`` does
  (``snapshot_dir=`` to put it elsewhere); ``ckptmerge merge OUTPUT_DIR/phema --schedule phema:sigma_rel=S``;
- on resume (``trainer.train(resume_from_checkpoint=...)``) the averager reloads that state, so the
  average continues exactly;
- under multi-process training (``torchrun``, DDP) every rank updates its averager; rank 0 writes the state
  and publishes the averaged folder. A sharded model (FSDP2) gets one state file per rank
  (``averager_state.rank{r}-of-{w}.pt``), resumable on the same world size (``online/state_files.py``);
- the live model always keeps its training weights; evaluate the average with
  ``with callback.averager.swapped(trainer.model): trainer.evaluate()``;
- with ``eval_every=N, data=[...], tokens=T`` (``online/periodic_eval.py``) every N-th step scores the training
  weights and the average on the same held-out windows and logs ``eval/raw/...`` and ``eval/merged/<kind>/...``
  through ``Trainer.log``, so they land in ``state.log_history`` and every ``report_to`` integration. Callbacks are
  not given the trainer: bind it with ``callback.attach(trainer)`` (which also adds the callback when absent).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.online.averager import Averager
from ckptmerge.online.periodic_eval import PeriodicEval
from ckptmerge.online.phema import PowerEMASnapshots
from ckptmerge.online.state_files import STEM, load_state, save_state

STATE_FILE = f"{STEM}.pt"


class AveragingCallback(TrainerCallback):
    def __init__(self, averager: Averager, *, save_averaged: bool = True, save_format: str = "hf",
                 eval_every: int | None = None, data=(), tokens: int = 32768, tokenizer=None,
                 eval_settings: EvalSettings | None = None, snapshot_dir: str | Path | None = None):
        self.averager = averager
        self.save_averaged = save_averaged
        self.save_format = save_format
        self.snapshot_dir = snapshot_dir  # phema snapshots: default OUTPUT_DIR/phema
        self._snapshot_step: int | None = None
        self.evaluation = PeriodicEval.from_options(eval_every, data, tokens, tokenizer, eval_settings)
        self._trainer = None

    def attach(self, trainer) -> AveragingCallback:
        """Log the periodic evaluation through ``trainer.log``; adds this callback to ``trainer`` when absent."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluation is not None and self._trainer is None:
            raise ConfigError("AveragingCallback(eval_every=...): the trainer to log through is unknown (callbacks are "
                              "not given it). Fix: callback.attach(trainer) before trainer.train()")
        if state.global_step == 0:  # a fresh run; on resume, Trainer has restored the step already
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        resume = getattr(args, "resume_from_checkpoint", None)
        for candidate in (Path(resume) if resume else None, folder):
            if candidate is not None and candidate.is_dir() and load_state(self.averager, candidate):
                return

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.averager.update(model, state.global_step, tokens_seen=getattr(state, "num_input_tokens_seen", None) or None)
        self._save_snapshots(args, state.global_step, model, processing_class or kwargs.get("tokenizer"))
        if self.evaluation is not None and self.evaluation.is_due(state.global_step) and self.averager.n_averaged:
            metrics = self.evaluation.evaluate(model, {self.averager.kind: self.averager},
                                               default_tokenizer=processing_class)
            should_log = control.should_log  # Trainer.log clears it; the step's own training log is still due
            self._trainer.log(metrics)  # log_history, then on_log of every callback (report_to integrations)
            control.should_log = should_log

    def _save_snapshots(self, args, step: int, model, tokenizer) -> None:
        """A phema averager's snapshots at a snapshot step (a collective: every rank saves, rank 0 publishes)."""
        averager = self.averager
        if not isinstance(averager, PowerEMASnapshots) or not averager.snapshot_due(step) or step == self._snapshot_step:
            return
        self._snapshot_step = step
        folders = averager.save_snapshots(Path(self.snapshot_dir or Path(args.output_dir) / "phema"), model)
        if tokenizer is not None and getattr(args, "process_index", 0) == 0:
            for folder in folders:
                tokenizer.save_pretrained(folder)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.averager.n_averaged == 0:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_state(self.averager, folder)  # rank 0, or every rank its own shards
        if self.save_averaged:  # a collective: every rank calls it, rank 0 publishes
            self.averager.save(folder / "averaged", model, format=self.save_format)
