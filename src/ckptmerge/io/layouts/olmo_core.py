"""OLMo-core ``Checkpointer``: ``stepN/model_and_optim/`` (DCP) and ``stepN/train/rank0.pt``.

The weights are the DCP ``model.*`` entries (OLMo-core's own storage-info dataclass in the
metadata is read as an inert placeholder); the step is ``global_step`` and the tokens
``global_train_tokens_seen`` of the trainer state in ``train/rank0.pt``.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts.base import Layout, StepInfo, as_int, dcp_reader, payload, step_from_name

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

MODEL_DIR = "model_and_optim"
TRAIN_STATE = Path("train") / "rank0.pt"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_DIR / ".metadata").is_file()


def read_step(path: Path) -> StepInfo:
    if (path / TRAIN_STATE).is_file():
        state = payload(path / TRAIN_STATE)
        step = as_int(state.get("global_step")) if isinstance(state, dict) else None
        if step is not None:
            tokens = as_int(state.get("global_train_tokens_seen"))
            return StepInfo(step, tokens_seen=tokens or None, source=str(TRAIN_STATE))
    return StepInfo(step_from_name(path, r"^step(\d+)$"))


def open_checkpoint(path: Path):
    return dcp_reader(path / MODEL_DIR, display_path=path)


LAYOUT = Layout("olmo-core", detect, read_step, open_checkpoint, storage="dcp")
