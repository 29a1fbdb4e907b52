"""Train a tiny model with DeepSpeed on CPU and save checkpoints with its own ``save_checkpoint``.

Usage: python deepspeed_run.py train RUN_DIR STAGE DTYPE   (writes RUN_DIR/checkpoints and RUN_DIR/reference.pt)
       (one process per rank, RANK and WORLD_SIZE set, for a run on several gloo ranks)
       python deepspeed_run.py resume RUN_DIR STAGE DTYPE CKPT_DIR TAG  (load_checkpoint, then train 2 steps)
       python deepspeed_run.py resume-default RUN_DIR STAGE DTYPE CKPT_DIR TAG  (DeepSpeed's default config:
           masters restored from the optimizer files; module and fp32 masters after loading and after one
           step with lr 0, in RUN_DIR/resumed_default.pt)

The reference is the fp64 mean of the last three checkpoints' module weights, each loaded by
DeepSpeed's own ``engine.load_checkpoint`` (ZeRO 3: consolidated by DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint``); ZeRO 1/2 also write ``reference_masters.pt``, the fp64 mean
of the fp32 masters as ``get_fp32_state_dict_from_zero_checkpoint`` consolidates them. Runs in its own process: DeepSpeed needs a process group.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), DS_ACCELERATOR="cpu")
for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", os.environ.get("RANK", "0"))):
    os.environ.setdefault(var, default)  # the test starts one process per rank with RANK / WORLD_SIZE set
import deepspeed

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip a C++ build the test does not need


def make_engine(stage: int, dtype: str, default_resume: bool = False):
    """``default_resume``: DeepSpeed's default ``load_from_fp32_weights`` (true), else false (masters from the module)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.Tanh(), torch.nn.Linear(15, 3))  # odd sizes: ZeRO pads
    if os.environ.get("CKPTMERGE_TEST_FREEZE"):  # a parameter the optimizer does not own (frozen_param_fragments)
        model[0].bias.requires_grad_(False)
    zero = {"stage": stage} if default_resume else {"stage": stage, "load_from_fp32_weights": False}
    config = {"train_batch_size": 4 * int(os.environ["WORLD_SIZE"]), "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": zero, "bf16": {"enabled": dtype == "bf16"}, "steps_per_print": 1000}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                         model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def train_steps(engine, steps: int, ckpt_dir=None, every: int = 0) -> float:
    g = torch.Generator().manual_seed(1000 * engine.global_steps + int(os.environ["RANK"]))  # each rank its own batch
    dtype = next(engine.module.parameters()).dtype
    for _ in range(steps):
        loss = engine(torch.randn(4, 8, generator=g).to(dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if every and engine.global_steps % every == 0:
            engine.save_checkpoint(ckpt_dir)
    return float(loss)


def save_masters_reference(ckpt_dir: str, path: str) -> None:
    """The fp64 mean of the last three checkpoints as DeepSpeed's own zero_to_fp32 consolidates them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    torch.distributed.barrier()  # every rank's files are written
    if int(os.environ["RANK"]) == 0:
        states = [get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=f"global_step{s}") for s in (4, 6, 8)]
        mean = {k: sum(s[k].detach().to(torch.float64) for s in states) / 3 for k in states[0]}
        torch.save(mean, path)
    torch.distributed.barrier()


def module_and_masters(engine) -> dict:
    """The module weights and DeepSpeed's own view of each parameter's fp32 master (every rank takes part)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {name: safe_get_full_fp32_param(p).detach().to(torch.float64) for name, p in engine.module.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):  # ZeRO 3: whole params
        module = {k: v.detach().to(torch.float64) for k, v in engine.module.named_parameters()}
    return {"module": module, "masters": masters}


def resume_default(engine, run_dir: str, ckpt_dir: str, tag: str) -> None:
    """Load under the default config, then one step with lr 0: module and masters after each."""
    engine.load_checkpoint(ckpt_dir, tag=tag)
    loaded = module_and_masters(engine)
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    train_steps(engine, 1)
    stepped = module_and_masters(engine)
    if int(os.environ["RANK"]) == 0:
        torch.save({"loaded": loaded, "stepped": stepped, "step": engine.global_steps},
                   os.path.join(run_dir, "resumed_default.pt"))


def main() -> None:
    mode, run_dir, stage, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    engine = make_engine(stage, dtype, default_resume=mode == "resume-default")
    if mode == "train":
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        train_steps(engine, 8, ckpt_dir, every=2)
        if stage == 3:
            return save_masters_reference(ckpt_dir, os.path.join(run_dir, "reference.pt"))
        if stage > 0:
            save_masters_reference(ckpt_dir, os.path.join(run_dir, "reference_masters.pt"))
        states = []
        for tag in ("global_step4", "global_step6", "global_step8"):
            engine.load_checkpoint(ckpt_dir, tag=tag)
            states.append({k: v.to(torch.float64) for k, v in engine.module.state_dict().items()})
        if int(os.environ["RANK"]) == 0:
            torch.save({k: sum(s[k] for s in states) / 3 for k in states[0]}, os.path.join(run_dir, "reference.pt"))
    elif mode == "resume-default":
        resume_default(engine, run_dir, sys.argv[5], sys.argv[6])
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
    # The work is done and its files closed; skip the interpreter's teardown, where a thread DeepSpeed or gloo
    # left behind once aborted a rank under load ("terminate called without an active exception", exit -6)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
