"""HF transformers ``Trainer``: ``checkpoint-N/`` folders with ``trainer_state.json``.

Under FSDP (accelerate's ``save_fsdp_model``) the weights are ``pytorch_model_fsdp_0/``, a DCP folder
of ``{"model": state_dict}`` (``SHARDED_STATE_DICT``), or ``pytorch_model_fsdp.bin``, a torch file of
the full state dict (``FULL_STATE_DICT``). Per-rank ``pytorch_model_fsdp_0_rank*.bin`` files
(``LOCAL_STATE_DICT`` or ``use_dcp=False``) hold flat shards ckptmerge cannot read.

The final model that ``trainer.save_model()`` writes at the run-directory root beside them is
not a step checkpoint; discovery skips it (merging/discover.py).
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.json_fields import check_log_history, check_types, is_count, load_json
from ckptmerge.io.layouts.base import (
    Layout,
    StepInfo,
    copy_folder_state,
    dcp_reader,
    detect_layout,
    open_plain_checkpoint,
    step_from_name,
    torch_file_reader,
    write_back_torch_file,
)

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

STATE_FILE = "trainer_state.json"
FSDP_SHARDED = "pytorch_model_fsdp_0"
FSDP_FULL = "pytorch_model_fsdp.bin"


def _fsdp_weights(path: Path) -> Path | None:
    if (path / FSDP_SHARDED / ".metadata").is_file():
        return path / FSDP_SHARDED
    return path / FSDP_FULL if (path / FSDP_FULL).is_file() else None


def detect(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file() and (
        detect_layout(path) is not None or _fsdp_weights(path) is not None or any(path.glob("pytorch_model_fsdp*")))


def open_checkpoint(path: Path):
    if detect_layout(path) is not None:
        return open_plain_checkpoint(path)
    weights = _fsdp_weights(path)
    if weights is None:
        raise CheckpointFormatError(f"{path}: an HF Trainer FSDP checkpoint with per-rank "
                                    f"{sorted(p.name for p in path.glob('pytorch_model_fsdp*'))[:2]} files "
                                    f"(LOCAL_STATE_DICT or use_dcp=False), which ckptmerge cannot read yet. Fix: save "
                                    f"with fsdp_state_dict_type SHARDED_STATE_DICT or FULL_STATE_DICT.")
    if weights.name == FSDP_SHARDED:
        return dcp_reader(weights, display_path=path)
    return torch_file_reader([weights], display_path=path)


def write_back(path: Path, merged: dict, dest: Path) -> None:
    """The folder's other state copied; FSDP weights (the copy HF resumes from under FSDP) rewritten with the merge."""
    from ckptmerge.io.dcp_rewrite import rewrite_dcp

    weights = _fsdp_weights(path)
    stale = sorted(p.name for p in path.glob("pytorch_model_fsdp*") if weights is None or p != weights)
    if stale:
        raise CheckpointFormatError(f"{path}: --as-checkpoint cannot rewrite the per-rank FSDP weights {stale[:2]}, "
                                    f"which HF would resume from instead of the merge; merge without it")
    copy_folder_state(path, dest, skip=(FSDP_SHARDED, FSDP_FULL))
    if weights is not None and weights.name == FSDP_SHARDED:
        rewrite_dcp(weights, dest / FSDP_SHARDED, merged)
    elif weights is not None:
        write_back_torch_file(weights, dest / FSDP_FULL, lambda state: state, merged)


def read_step(path: Path) -> StepInfo:
    state = load_json(path / STATE_FILE) or {}
    check_types(path / STATE_FILE, state, {"global_step": is_count, "num_input_tokens_seen": is_count})
    check_log_history(path / STATE_FILE, state.get("log_history", []))
    lrs = [e["learning_rate"] for e in state.get("log_history", []) if "learning_rate" in e]
    return StepInfo(step=state.get("global_step", step_from_name(path, r"(\d+)$")),
                    tokens_seen=state.get("num_input_tokens_seen") or None,
                    lr=lrs[-1] if lrs else None, source=STATE_FILE)


LAYOUT = Layout("hf-trainer", detect, read_step, open_checkpoint, write_back=write_back)
