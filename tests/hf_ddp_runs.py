"""HF ``Trainer`` runs under DDP (2 gloo ranks on CPU) with the averaging callback, for ``test_hf_callback.py``.

Each rank trains a tiny Llama for 4 optimizer steps (saves at 2 and 4), records the weights after every step
into a hand-computed fp64 EMA (the reference), then a second Trainer resumes from ``checkpoint-2`` with a
fresh callback. What each rank saw is written to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from ckptmerge.online import EMA
from ckptmerge.online.hf_callback import AveragingCallback

DECAY = 0.6


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class Recorder(transformers.TrainerCallback):
    """Reference: the weights after each optimizer step, folded into an fp64 EMA by hand."""

    def __init__(self):
        self.ema, self.steps = None, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        current = {k: v.detach().double().clone() for k, v in model.named_parameters()}
        self.ema = current if self.ema is None else {k: DECAY * self.ema[k] + (1 - DECAY) * current[k] for k in current}
        self.steps.append(state.global_step)


def trainer(out: Path, callbacks: list) -> transformers.Trainer:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                                          learning_rate=5e-3, save_steps=2, save_strategy="steps", logging_strategy="no",
                                          report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                                          ddp_backend="gloo")
    return transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args, train_dataset=Tokens(),
                                callbacks=callbacks)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    run_dir = Path(out) / "run"
    averaging, recorder = AveragingCallback(EMA(DECAY)), Recorder()
    first = trainer(run_dir, [averaging, recorder])
    first.train()
    result = {"steps": recorder.steps, "reference": recorder.ema, "averaged": averaging.averager.averaged_state_dict(),
              "world_size": first.args.world_size, "ddp": type(first.model_wrapped).__name__}
    torch.distributed.barrier()
    resumed = AveragingCallback(EMA(DECAY))
    trainer(run_dir, [resumed]).train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    result["resumed"] = resumed.averager.averaged_state_dict()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # the Trainer leaves the process group up; a rank exiting with gloo's threads running can abort (SIGABRT)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
