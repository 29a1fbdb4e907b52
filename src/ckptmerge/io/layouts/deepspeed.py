"""DeepSpeed ``save_checkpoint``: ``global_stepN/mp_rank_00_model_states.pt`` and a ``latest`` tag file.

ZeRO 0/1/2: the weights are ``module`` in the model-states file, in the training dtype (bf16 runs store
bf16 there; the fp32 masters live in the ZeRO optimizer shards). Half-precision weights are read as
fp32 (exactly), so a merge of a bf16 run is written in fp32, like DeepSpeed's own ``zero_to_fp32``
export, and keeps the mean's precision.
ZeRO 3: each rank writes ``zero_pp_rank_R_mp_rank_00_model_states.pt`` whose ``module`` holds empty
placeholders; the weights are the fp32 masters gathered from every rank's optimizer file
(io/deepspeed_zero.py). The step is ``global_steps``.
Tensor / pipeline parallel checkpoints (``mp_rank_01``, ``layer_*``) are not read.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    payload,
    step_from_name,
    weights_reader,
    write_back_torch_file,
)

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _is_zero3(path: Path) -> bool:
    return not (path / MODEL_STATES).is_file() and (path / ZERO3_MODEL_STATES).is_file()


def _model_states(path: Path) -> Path:
    return path / (ZERO3_MODEL_STATES if _is_zero3(path) else MODEL_STATES)


def detect(path: Path) -> bool:
    return path.is_dir() and ((path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file())


def pointer(path: Path) -> str | None:
    if path.name == "latest" and path.is_file():
        return "DeepSpeed's pointer to the newest tag"
    if path.name in ("zero_to_fp32.py", "zero_to_torch.py"):
        return "DeepSpeed's conversion script"
    return None


def read_step(path: Path) -> StepInfo:
    state = payload(_model_states(path))
    step = as_int(state.get("global_steps")) if isinstance(state, dict) else None
    if step is not None:
        return StepInfo(step, source=f"{_model_states(path).name}:global_steps")
    return StepInfo(step_from_name(path, r"(\d+)$"))


def open_checkpoint(path: Path):
    from ckptmerge.io.deepspeed_zero import ZeroMastersReader
    from ckptmerge.io.torch_reader import check_kept_fraction

    if any(path.glob("*mp_rank_0[1-9]*_model_states.pt")) or any(path.glob("layer_*-model_states.pt")):
        raise CheckpointFormatError(f"{path}: a tensor- or pipeline-parallel DeepSpeed checkpoint (mp_rank_01 / "
                                    f"layer_* files), which ckptmerge cannot read yet. Fix: consolidate it with "
                                    f"DeepSpeed's ds_to_universal.py first.")
    if _is_zero3(path):
        return ZeroMastersReader(path, path / ZERO3_MODEL_STATES)
    state = payload(path / MODEL_STATES)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointFormatError(f"{path / MODEL_STATES}: no 'module' weights in this DeepSpeed checkpoint")
    check_kept_fraction(path / MODEL_STATES, module, state)
    return weights_reader(path, _half_to_fp32(module), "deepspeed")


def _half_to_fp32(module: dict) -> dict:
    """bf16 / fp16 tensors as fp32 copies; tensors that share storage (tied weights) keep sharing it."""
    import torch

    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in module.items():
        if not (isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)):
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        out[name] = copies.setdefault(key, t.float())
    return out


def write_back(path: Path, merged: dict, dest: Path) -> None:
    """``dest/<tag>/`` with the merged ``module`` and the newest optimizer shards, and ``dest/latest`` naming it.

    ZeRO 1/2 restore the fp32 masters from the optimizer shards unless the config says
    ``zero_optimization.load_from_fp32_weights: false``; with it they start from the merged module.
    """
    import shutil

    if _is_zero3(path):
        raise CheckpointFormatError(f"{path}: --as-checkpoint cannot write a DeepSpeed ZeRO 3 checkpoint yet; "
                                    f"merge without it and load the merged model.safetensors into your model")
    tag = dest / path.name
    shutil.copytree(path, tag, ignore=shutil.ignore_patterns(MODEL_STATES))
    write_back_torch_file(path / MODEL_STATES, tag / MODEL_STATES, lambda state: state["module"], merged)
    (dest / "latest").write_text(path.name)


LAYOUT = Layout("deepspeed", detect, read_step, open_checkpoint, pointer, write_back=write_back)
