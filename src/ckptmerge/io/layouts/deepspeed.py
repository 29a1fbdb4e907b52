"""DeepSpeed ``save_checkpoint``: ``global_stepN/mp_rank_00_model_states.pt`` and a ``latest`` tag file.

ZeRO 0/1/2: the weights are ``module`` in the model-states file, in the training dtype (bf16 runs store
bf16 there; the fp32 masters live in the ZeRO optimizer shards). Half-precision weights are read as
fp32 (exactly), so a merge of a bf16 run is written in fp32, like DeepSpeed's own ``zero_to_fp32``
export, and keeps the mean's precision.
ZeRO 3: each rank writes ``zero_pp_rank_R_mp_rank_00_model_states.pt`` whose ``module`` holds empty
placeholders; the weights are the fp32 masters gathered from every rank's optimizer file
(io/deepspeed_zero.py). The step is ``global_steps``.
Tensor / pipeline parallel checkpoints (``mp_rank_01``, ``layer_*``) are not read.
Rank 0's optimizer file (``[bf16_]zero_pp_rank_0_mp_rank_00_optim_states.pt``) named as the checkpoint
opens the fp32 masters of its tag at any stage (``merge --fp32-masters`` names it: ``masters_entry``).
``--as-checkpoint`` rewrites the module weights and every rank's fp32 master partitions
(io/deepspeed_masters_rewrite.py), so DeepSpeed's default resume continues from the merge, and the
``frozen_param_fragments`` (parameters the optimizer does not own) that ``zero_to_fp32`` reads.
"""

from __future__ import annotations

import math
from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.remote import Url
from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    as_int,
    payload,
    step_from_name,
    torch_weights_reader,
    zero_masters_reader,
)

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
RANK0_OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _tag(path: Path) -> Path:
    """The tag folder of an entry: the folder itself, or the folder of rank 0's optimizer file."""
    return path.parent if path.is_file() else path


def _is_zero3(path: Path) -> bool:
    path = _tag(path)
    return not (path / MODEL_STATES).is_file() and (path / ZERO3_MODEL_STATES).is_file()


def _model_states(path: Path) -> Path:
    return _tag(path) / (ZERO3_MODEL_STATES if _is_zero3(path) else MODEL_STATES)


def is_masters_name(name: str) -> bool:
    """Whether ``name`` is rank 0's ZeRO optimizer file (``[bf16_]zero_pp_rank_0_mp_rank_00_optim_states.pt``)."""
    return name.endswith(RANK0_OPTIM) and name.removesuffix(RANK0_OPTIM) in ("", "bf16_")


def _is_masters_file(path: Path) -> bool:
    return path.is_file() and is_masters_name(path.name)


def detect(path: Path) -> bool:
    if _is_masters_file(path):
        return (path.parent / MODEL_STATES).is_file() or (path.parent / ZERO3_MODEL_STATES).is_file()
    return path.is_dir() and ((path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file())


def masters_entry(path: Path) -> Path:
    """Rank 0's optimizer file of a DeepSpeed tag folder: the entry that opens its fp32 masters (a URL's, for a
    checkpoint at a URL: one listing of it, ``io/remote_layout.py``)."""
    if isinstance(path, Url):
        from ckptmerge.io.remote_path import RemotePath
        from ckptmerge.io.remote_tree import RemoteTree

        return masters_entry(RemotePath(RemoteTree.list(path))).url
    found = [_tag(path) / (p + RANK0_OPTIM) for p in ("", "bf16_") if (_tag(path) / (p + RANK0_OPTIM)).is_file()]
    if not detect(path) or not found:
        raise CheckpointFormatError(f"{path}: --fp32-masters reads the fp32 masters of DeepSpeed ZeRO checkpoints "
                                    f"(*zero_pp_rank_0_mp_rank_00_optim_states.pt), and this checkpoint has none; "
                                    f"drop --fp32-masters")
    return found[0]


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
    _refuse_model_parallel(_tag(path))
    if _is_zero3(path) or _is_masters_file(path):
        return zero_masters_reader(_tag(path), _model_states(path), display_path=path)

    def module_of(state: object) -> dict:
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise CheckpointFormatError(f"{path / MODEL_STATES}: no 'module' weights in this DeepSpeed checkpoint")
        return module

    return torch_weights_reader(path, path / MODEL_STATES, module_of, "deepspeed", half_to_fp32=True)


def _refuse_model_parallel(path: Path) -> None:
    if any(path.glob("*mp_rank_0[1-9]*_model_states.pt")) or any(path.glob("layer_*-model_states.pt")):
        raise CheckpointFormatError(f"{path}: a tensor- or pipeline-parallel DeepSpeed checkpoint (mp_rank_01 / "
                                    f"layer_* files), which ckptmerge cannot read yet. Fix: consolidate it with "
                                    f"DeepSpeed's ds_to_universal.py first.")


def check_write_back(path: Path) -> None:
    """Refuse, before any work, a hand-back whose second copy of the weights could not be rewritten."""
    from ckptmerge.io.deepspeed_zero import ZeroMastersReader, optim_files

    tag = _tag(path)
    _refuse_model_parallel(tag)
    state = payload(_model_states(path))
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if isinstance(optimizer, dict) and any("fp32" in str(k) for k in optimizer):
        raise CheckpointFormatError(f"{_model_states(path)}: the optimizer in this file keeps fp32 master weights "
                                    f"({', '.join(str(k) for k in optimizer if 'fp32' in str(k))}) that "
                                    f"--as-checkpoint cannot rewrite; merge without it and load the merged "
                                    f"model.safetensors into your model")
    if optim_files(tag):
        ZeroMastersReader(tag, _model_states(path)).close()  # the masters parse, so they can be rewritten


def write_back(path: Path, merged: dict, dest: Path) -> None:
    """``dest/<tag>/``: the newest tag with the merge in its module weights and every rank's fp32 masters,
    and ``dest/latest`` naming it. The optimizer's moments and step counts stay the newest checkpoint's."""
    import shutil

    from ckptmerge.io.deepspeed_masters_rewrite import rewrite_masters
    from ckptmerge.io.deepspeed_zero import optim_files

    src = _tag(path)
    tag = dest / src.name
    rewritten = {f.name for f in optim_files(src)} | {f.name for f in src.glob("*model_states.pt")}
    shutil.copytree(src, tag, ignore=lambda folder, names: [n for n in names if Path(folder) == src and n in rewritten])
    for states in src.glob("*model_states.pt"):
        _rewrite_module(states, tag / states.name, merged)
    if optim_files(src):
        rewrite_masters(src, tag, _model_states(path), merged)
    (dest / "latest").write_text(src.name)


def _rewrite_module(src: Path, dst: Path, merged: dict) -> None:
    """The model-states file with its ``module`` weights set to the merge (in their stored dtype: bf16 runs
    round); ZeRO 3's empty placeholders stay empty (its weights are the masters)."""
    from ckptmerge.io.torch_file_rewrite import load_tensor_refs, rewrite_tensors
    from ckptmerge.io.torch_reader import strip_prefixes

    refs = load_tensor_refs(src)["module"]
    names = strip_prefixes(src, {k: k for k in refs})
    if not _is_zero3(src.parent):
        missing = sorted(set(merged) - set(names))
        if missing:
            raise CheckpointFormatError(f"{src}: merged tensors {missing[:8]} have no place in the newest checkpoint")
    values = {refs[names[n]]: merged[n] for n in merged if n in names and math.prod(refs[names[n]].shape) > 0}
    values.update(_frozen_fragments(src, merged))
    rewrite_tensors(src, dst, values)


def _frozen_fragments(src: Path, merged: dict) -> dict:
    """This file's ``frozen_param_fragments`` (what ``zero_to_fp32`` reads for parameters the optimizer does not
    own) set to the merge: ZeRO 3, rank R's ``ceil(numel / world)`` elements of each, its padding kept; ZeRO 1/2,
    the whole parameter."""
    import re

    from ckptmerge.io.torch_file_rewrite import load_tensor_refs
    from ckptmerge.io.torch_reader import load_torch_payload, strip_prefixes

    refs = load_tensor_refs(src).get("frozen_param_fragments")
    if not isinstance(refs, dict) or not refs:
        return {}
    stored = load_torch_payload(src)["frozen_param_fragments"]
    rank = int(m[1]) if (m := re.match(r"zero_pp_rank_(\d+)_", src.name)) else 0
    values = {}
    for name, key in strip_prefixes(src, {k: k for k in refs}).items():
        part = math.prod(refs[key].shape)
        if part == 0:
            continue
        if name not in merged:
            raise CheckpointFormatError(f"{src}: the frozen parameter {name!r} has no merged tensor; merge without "
                                        f"--as-checkpoint")
        piece = merged[name].reshape(-1)[rank * part:(rank + 1) * part]
        fragment = stored[key].detach().reshape(-1).clone()
        fragment[:piece.numel()] = piece.to(fragment.dtype)
        values[refs[key]] = fragment.reshape(refs[key].shape)
    return values


LAYOUT = Layout("deepspeed", detect, read_step, open_checkpoint, pointer, write_back=write_back)
