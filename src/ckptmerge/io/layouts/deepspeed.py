"""DeepSpeed ``save_checkpoint``: ``global_stepN/mp_rank_00_model_states.pt`` and a ``latest`` tag file.

The weights are ``module`` in the model-states file, in the training dtype (bf16 runs store bf16
there; the fp32 masters live in the ZeRO optimizer shards). The step is ``global_steps``.
Tensor / pipeline parallel checkpoints (``mp_rank_01``, ``layer_*``) are not read.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.layouts.base import Layout, StepInfo, as_int, payload, step_from_name, weights_reader
from ckptmerge.io.torch_reader import check_kept_fraction

MODEL_STATES = "mp_rank_00_model_states.pt"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_STATES).is_file()


def pointer(path: Path) -> str | None:
    if path.name == "latest" and path.is_file():
        return "DeepSpeed's pointer to the newest tag"
    if path.name in ("zero_to_fp32.py", "zero_to_torch.py"):
        return "DeepSpeed's conversion script"
    return None


def read_step(path: Path) -> StepInfo:
    state = payload(path / MODEL_STATES)
    step = as_int(state.get("global_steps")) if isinstance(state, dict) else None
    if step is not None:
        return StepInfo(step, source=f"{MODEL_STATES}:global_steps")
    return StepInfo(step_from_name(path, r"(\d+)$"))


def open_checkpoint(path: Path):
    if any(path.glob("mp_rank_0[1-9]*_model_states.pt")) or any(path.glob("layer_*-model_states.pt")):
        raise CheckpointFormatError(f"{path}: tensor- or pipeline-parallel DeepSpeed checkpoint; ckptmerge reads "
                                    f"single-rank model states only. Fix: run DeepSpeed's zero_to_fp32.py first.")
    state = payload(path / MODEL_STATES)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointFormatError(f"{path / MODEL_STATES}: no 'module' weights in this DeepSpeed checkpoint")
    check_kept_fraction(path / MODEL_STATES, module, state)
    return weights_reader(path, module, "deepspeed")


LAYOUT = Layout("deepspeed", detect, read_step, open_checkpoint, pointer)
