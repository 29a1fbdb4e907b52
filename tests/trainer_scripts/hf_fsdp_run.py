"""The HF ``Trainer`` itself under FSDP (accelerate's FSDP plugin, ``fsdp="full_shard"``, FSDP2) on 2 gloo ranks.

Usage: python hf_fsdp_run.py train RUN_DIR STATE_DICT_TYPE          (writes RUN_DIR/checkpoint-{2,4,6,8})
       python hf_fsdp_run.py resume CHECKPOINT OUT STATE_DICT_TYPE  (resumes; writes OUT/resumed.pt)
Starts both ranks itself (``MASTER_PORT`` from the environment).

accelerate takes its FSDP branch only for accelerator devices (``MULTI_GPU``, ``MULTI_XPU``, ...): on CPU it
silently falls back to DDP and the Trainer writes plain ``model.safetensors`` checkpoints. ``_fsdp_on_cpu`` does
for ``MULTI_CPU`` what that branch does (``distributed_type = FSDP``, ``fsdp_plugin = plugin``); the wrapping
(``fully_shard``), the training loop, ``save_fsdp_model`` / ``save_fsdp_optimizer`` and, on resume,
``load_fsdp_model`` are the Trainer's and accelerate's own code. FSDP1 cannot run on CPU here ("Inconsistent
compute device and `device_id`: cpu vs cpu:0"), so the run uses FSDP2 (``fsdp_config={"version": 2}``).

On resume the Trainer loads the checkpoint under FSDP before ``on_train_begin``; a callback gathers every
parameter there (``DTensor.full_tensor``) and rank 0 saves them, with the step the Trainer resumed at. The
Trainer then takes one more step (its loop checks ``max_steps`` after a step) at learning rate 0, the end of the
linear schedule it restored, and saves ``OUT/checkpoint-9``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import transformers

MAX_STEPS = 8


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class LoadedWeights(transformers.TrainerCallback):
    """The weights the resumed Trainer starts from, gathered from the FSDP2 shards on every rank, and the learning
    rate of each step it takes after (the linear schedule is at 0 by step ``MAX_STEPS``)."""

    def __init__(self, out: Path):
        self.out, self.record = out, {"lrs": []}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        self.record.update(global_step=state.global_step, fsdp=type(model).__name__, weights={
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.named_parameters()})

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.record["lrs"].append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, args, state, control, **kwargs):
        if args.process_index == 0:
            torch.save(self.record | {"final_step": state.global_step}, self.out / "resumed.pt")


def _fsdp_on_cpu() -> None:
    import accelerate.state as st

    init = st.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == st.DistributedType.MULTI_CPU:
            self.distributed_type = st.DistributedType.FSDP  # what the branch for MULTI_GPU etc. does
            self.fsdp_plugin = fsdp_plugin

    st.AcceleratorState.__init__ = patched


def trainer(out: str, state_dict_type: str, callbacks: list) -> transformers.Trainer:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=5e-3, save_steps=2,
        save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
        ddp_backend="gloo", fsdp=True,
        fsdp_config={"version": 2, "state_dict_type": state_dict_type, "reshard_after_forward": True,
                     "sync_module_states": "false"})
    made = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args, train_dataset=Tokens(),
                                callbacks=callbacks)
    assert made.is_fsdp_enabled and str(made.accelerator.state.distributed_type) == "DistributedType.FSDP"
    return made


def worker(rank: int, world: int, port: int, mode: str, path: str, out: str, state_dict_type: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _fsdp_on_cpu()
    if mode == "train":
        trainer(path, state_dict_type, []).train()
    else:
        trainer(out, state_dict_type, [LoadedWeights(Path(out))]).train(resume_from_checkpoint=path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    path, out, sd_type = (sys.argv[2], "", sys.argv[3]) if mode == "train" else tuple(sys.argv[2:5])
    mp.spawn(worker, args=(2, int(os.environ.get("MASTER_PORT", "29640")), mode, path, out, sd_type), nprocs=2)
