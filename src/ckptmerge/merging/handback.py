"""``merge --as-checkpoint``: the merged weights written back as the newest input's own trainer checkpoint.

The merge's output folder (merged safetensors + ``merge.json``) also receives the newest
checkpoint in its framework's layout, with the merged weights in place of its own and its
optimizer, scheduler, loop and RNG state unchanged, so the trainer resumes from the merge
(PMA-init, spike recovery) with its own resume call. Each layout's ``write_back``
(io/layouts/) knows where its weights live; plain HF folders get the newest folder's
non-weight files copied beside the merged ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ckptmerge.errors import CkptMergeError
from ckptmerge.io.layout import detect_layout
from ckptmerge.io.layouts import deepspeed, match_layout
from ckptmerge.io.layouts.base import copy_folder_state
from ckptmerge.merging.checkpoint import CheckpointRef


def check_write_back(newest: CheckpointRef, out_dtype: str | None = None) -> None:
    """Raise before any work when the newest checkpoint's layout cannot be written back, or when it keeps a
    second copy of the weights (one the trainer resumes from) that the hand-back would leave unmerged.
    ``out_dtype``: the merge's output dtype (``MergeOptions.out_dtype``), when one is forced."""
    layout = match_layout(newest.path)
    if layout is not None and layout.write_back is None:
        raise CkptMergeError(f"{newest.path}: --as-checkpoint is not supported for {layout.name} checkpoints yet; "
                             f"merge without it and load the merged safetensors into your model instead")
    if layout is deepspeed.LAYOUT:
        if out_dtype not in (None, "float32"):
            raise CkptMergeError(f"{newest.path}: DeepSpeed's fp32 master weights are handed back from an fp32 merge; "
                                 f"drop --out-dtype {out_dtype} (the module weights are rounded to the run's dtype)")
        deepspeed.check_write_back(newest.path)
    nested = [p.name for p in newest.path.glob("global_step*") if deepspeed.detect(p)] if newest.path.is_dir() else []
    if layout is not deepspeed.LAYOUT and nested:
        raise CkptMergeError(f"{newest.path}: {nested[0]}/ holds DeepSpeed's own copy of the weights (module and "
                             f"fp32 masters), which the trainer resumes from and --as-checkpoint cannot rewrite "
                             f"here; merge without it and load the merged model.safetensors into your model")
    if layout is None and not (newest.path.is_dir() and detect_layout(newest.path)):
        raise CkptMergeError(f"{newest.path}: --as-checkpoint needs a trainer checkpoint ckptmerge knows "
                             f"(HF Trainer / Accelerate folder, Lightning, DeepSpeed, nanoGPT, litgpt, Composer)")


def write_back(newest: CheckpointRef, merged_dir: Path) -> None:
    """Write the merged tensors of ``merged_dir`` as ``newest``'s framework checkpoint inside ``merged_dir``."""
    layout = match_layout(newest.path)
    if layout is None:
        copy_folder_state(newest.path, merged_dir)
        return
    merged = {}
    for file in sorted(merged_dir.glob("*.safetensors")):
        merged.update(load_file(file))
    layout.write_back(newest.path, merged, merged_dir)
