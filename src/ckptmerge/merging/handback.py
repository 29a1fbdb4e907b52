"""``merge --as-checkpoint``: the merged weights written back as the newest input's own trainer checkpoint.

The merge's output folder (merged safetensors + ``merge.json``) also receives the newest
checkpoint in its framework's layout, with the merged weights in place of its own and its
optimizer, scheduler, loop and RNG state unchanged, so the trainer resumes from the merge
(PMA-init, spike recovery) with its own resume call. Each layout's ``write_back``
(io/layouts/) knows where its weights live; plain HF folders get the newest folder's
non-weight files copied beside the merged ``model.safetensors``.

A newest checkpoint at a URL (``prepare_write_back``): the refusals a listing can answer come first, then its
objects are copied to a local temporary (``io/remote_handback.py``, versions pinned), checked like a local one,
and carried by the ref (``FetchedCheckpointRef``) to ``write_back``, which writes from the copy and removes it.
The merge still reads the checkpoint's weights by range from its URL, and ``merge.json`` records the URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from safetensors.torch import load_file

from ckptmerge.errors import CkptMergeError
from ckptmerge.io.layouts import deepspeed, match_layout
from ckptmerge.io.layouts.base import copy_folder_state, detect_layout
from ckptmerge.io.remote import Url
from ckptmerge.io.remote_handback import LocalCopy, copy_checkpoint
from ckptmerge.io.remote_layout import CheckpointPath, match_remote_layout
from ckptmerge.io.remote_tree import RemoteTree
from ckptmerge.merging.checkpoint import CheckpointRef


@dataclass(frozen=True)
class FetchedCheckpointRef(CheckpointRef):
    """The newest checkpoint at a URL with the local copy its hand-back is written from (``path`` stays the URL)."""

    local_copy: LocalCopy | None = field(default=None, compare=False, repr=False)

    def local(self) -> CheckpointRef:
        """This checkpoint as the layouts see its copy: a plain ref whose path is the local copy."""
        values = {f.name: getattr(self, f.name) for f in fields(CheckpointRef)}
        return CheckpointRef(**{**values, "path": self.local_copy.path})


def prepare_write_back(newest: CheckpointRef, out_dtype: str | None = None) -> CheckpointRef:
    """``check_write_back`` before any work; for a checkpoint at a URL, the refusals its listing answers, then the
    copy of its objects (io/remote_handback.py) and the full check on that copy. Returns the ref to merge: the same
    one, or a ``FetchedCheckpointRef`` carrying the copy (removed by ``write_back`` or ``discard_copy``)."""
    if not isinstance(newest.path, Url):
        check_write_back(newest, out_dtype)
        return newest
    tree = RemoteTree.list(newest.path)
    remote = CheckpointPath(tree)
    _check_layout(remote, match_remote_layout(remote), out_dtype)  # before a byte is copied
    fetched = FetchedCheckpointRef(**{f.name: getattr(newest, f.name) for f in fields(CheckpointRef)},
                                   local_copy=copy_checkpoint(tree))
    try:
        with fetched.local_copy.named_by_url():
            check_write_back(fetched.local(), out_dtype)
    except BaseException:
        fetched.local_copy.remove()
        raise
    return fetched


def discard_copy(newest: CheckpointRef) -> None:
    """Remove the local copy a ``FetchedCheckpointRef`` carries (nothing for a local checkpoint)."""
    if isinstance(newest, FetchedCheckpointRef):
        newest.local_copy.remove()


def check_write_back(newest: CheckpointRef, out_dtype: str | None = None) -> None:
    """Raise before any work when the newest checkpoint's layout cannot be written back, or when it keeps a
    second copy of the weights (one the trainer resumes from) that the hand-back would leave unmerged.
    ``out_dtype``: the merge's output dtype (``MergeOptions.out_dtype``), when one is forced."""
    layout = match_layout(newest.path)
    _check_layout(newest.path, layout, out_dtype)
    if layout is deepspeed.LAYOUT:
        deepspeed.check_write_back(newest.path)


def _check_layout(path: Path, layout, out_dtype: str | None) -> None:
    """The refusals that need only names and the layout (``path`` local, or a remote ``CheckpointPath``)."""
    if layout is not None and layout.write_back is None:
        raise CkptMergeError(f"{path}: --as-checkpoint is not supported for {layout.name} checkpoints yet; "
                             f"merge without it and load the merged safetensors into your model instead")
    if layout is deepspeed.LAYOUT and out_dtype not in (None, "float32"):
        raise CkptMergeError(f"{path}: DeepSpeed's fp32 master weights are handed back from an fp32 merge; "
                             f"drop --out-dtype {out_dtype} (the module weights are rounded to the run's dtype)")
    nested = [p.name for p in path.glob("global_step*") if deepspeed.detect(p)] if path.is_dir() else []
    if layout is not deepspeed.LAYOUT and nested:
        raise CkptMergeError(f"{path}: {nested[0]}/ holds DeepSpeed's own copy of the weights (module and "
                             f"fp32 masters), which the trainer resumes from and --as-checkpoint cannot rewrite "
                             f"here; merge without it and load the merged model.safetensors into your model")
    if layout is None and not (path.is_dir() and detect_layout(path)):
        raise CkptMergeError(f"{path}: --as-checkpoint needs a trainer checkpoint ckptmerge knows "
                             f"(HF Trainer / Accelerate folder, Lightning, DeepSpeed, nanoGPT, litgpt, Composer)")


def write_back(newest: CheckpointRef, merged_dir: Path, pin=None) -> None:
    """Write the merged tensors of ``merged_dir`` as ``newest``'s framework checkpoint inside ``merged_dir``.

    For a ``FetchedCheckpointRef``, ``pin`` is the merge's pin of it (``io.remote_layout.PinnedRemoteCheckpoint``,
    verified just before): the copy must hold the versions it pinned, so the state handed back was saved with the
    weights merged. The copy is removed afterwards, on failure too."""
    if not isinstance(newest, FetchedCheckpointRef):
        return _write_back(newest, merged_dir)
    try:
        newest.local_copy.check_pinned(pin.versions)
        with newest.local_copy.named_by_url():
            _write_back(newest.local(), merged_dir)
    finally:
        newest.local_copy.remove()


def _write_back(newest: CheckpointRef, merged_dir: Path) -> None:
    layout = match_layout(newest.path)
    if layout is None:
        copy_folder_state(newest.path, merged_dir)
        return
    merged = {}
    for file in sorted(merged_dir.glob("*.safetensors")):
        merged.update(load_file(file))
    layout.write_back(newest.path, merged, merged_dir)
