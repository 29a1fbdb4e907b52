"""An HF ``transformers.TrainerCallback`` that keeps an online average while ``Trainer`` trains.

    from ckptmerge.online import EMA
    from ckptmerge.online.hf_callback import AveragingCallback
    trainer = Trainer(..., callbacks=[AveragingCallback(EMA(half_life=500))])

- after every optimizer step (``on_step_end``, once per step under gradient accumulation) the
  averager folds in the model's weights;
- at every save, ``checkpoint-N/averaged/`` holds the averaged model (an HF folder that
  ``ckptmerge eval`` and ``merge`` read; ``save_format="dcp"`` writes a DCP folder instead) and
  ``checkpoint-N/averager_state.pt`` its state;
- on resume (``trainer.train(resume_from_checkpoint=...)``) the averager reloads that state, so the
  average continues exactly;
- under multi-process training (``torchrun``, DDP) every rank updates its averager; rank 0 writes the state
  and publishes the averaged folder. A sharded model (FSDP2) gets one state file per rank
  (``averager_state.rank{r}-of-{w}.pt``), resumable on the same world size (``online/state_files.py``);
- the live model always keeps its training weights; evaluate the average with
  ``with callback.averager.swapped(trainer.model): trainer.evaluate()``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ckptmerge.online.averager import Averager
from ckptmerge.online.state_files import STEM, load_state, save_state

STATE_FILE = f"{STEM}.pt"


class AveragingCallback(TrainerCallback):
    def __init__(self, averager: Averager, *, save_averaged: bool = True, save_format: str = "hf"):
        self.averager = averager
        self.save_averaged = save_averaged
        self.save_format = save_format

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a fresh run; on resume, Trainer has restored the step already
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        resume = getattr(args, "resume_from_checkpoint", None)
        for candidate in (Path(resume) if resume else None, folder):
            if candidate is not None and candidate.is_dir() and load_state(self.averager, candidate):
                return

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.averager.update(model, state.global_step, tokens_seen=getattr(state, "num_input_tokens_seen", None) or None)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.averager.n_averaged == 0:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_state(self.averager, folder)  # rank 0, or every rank its own shards
        if self.save_averaged:  # a collective: every rank calls it, rank 0 publishes
            self.averager.save(folder / "averaged", model, format=self.save_format)
