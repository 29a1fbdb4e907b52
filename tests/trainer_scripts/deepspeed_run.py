"""Train a tiny model with DeepSpeed on CPU and save checkpoints with its own ``save_checkpoint``.

Usage: python deepspeed_run.py train RUN_DIR STAGE DTYPE   (writes RUN_DIR/checkpoints and RUN_DIR/reference.pt)
       python deepspeed_run.py resume RUN_DIR STAGE DTYPE CKPT_DIR TAG  (load_checkpoint, then train 2 steps)

The reference is the fp64 mean of the last three checkpoints' module weights, each loaded by
DeepSpeed's own ``engine.load_checkpoint``. Runs in its own process: DeepSpeed needs a process group.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
import deepspeed  # noqa: E402

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip a C++ build the test does not need


def make_engine(stage: int, dtype: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "load_from_fp32_weights": False}, "bf16": {"enabled": dtype == "bf16"},
              "steps_per_print": 1000}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train_steps(engine, steps: int, ckpt_dir=None, every: int = 0) -> float:
    g = torch.Generator().manual_seed(engine.global_steps)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(steps):
        loss = engine(torch.randn(4, 8, generator=g).to(dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if every and engine.global_steps % every == 0:
            engine.save_checkpoint(ckpt_dir)
    return float(loss)


def main() -> None:
    mode, run_dir, stage, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    engine = make_engine(stage, dtype)
    if mode == "train":
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        train_steps(engine, 8, ckpt_dir, every=2)
        states = []
        for tag in ("global_step4", "global_step6", "global_step8"):
            engine.load_checkpoint(ckpt_dir, tag=tag)
            states.append({k: v.to(torch.float64) for k, v in engine.module.state_dict().items()})
        torch.save({k: sum(s[k] for s in states) / 3 for k in states[0]}, os.path.join(run_dir, "reference.pt"))
    else:
        ckpt_dir, tag = sys.argv[5], sys.argv[6]
        engine.load_checkpoint(ckpt_dir, tag=tag)
        weights = {k: v.to(torch.float64) for k, v in engine.module.state_dict().items()}
        step = engine.global_steps
        loss = train_steps(engine, 2)
        torch.save(weights, os.path.join(run_dir, "resumed_weights.pt"))
        with open(os.path.join(run_dir, "resumed.json"), "w") as f:
            json.dump({"step": step, "after": engine.global_steps, "loss": loss}, f)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # DeepSpeed leaves its gloo group up; stop its threads before exit
        torch.distributed.destroy_process_group()
