"""HF transformers ``Trainer``: ``checkpoint-N/`` folders with ``trainer_state.json``.

The final model that ``trainer.save_model()`` writes at the run-directory root beside them is
not a step checkpoint; discovery skips it (merging/discover.py).
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.json_fields import check_log_history, check_types, is_count, load_json
from ckptmerge.io.layout import detect_layout, open_plain_checkpoint
from ckptmerge.io.layouts.base import Layout, StepInfo, step_from_name

STATE_FILE = "trainer_state.json"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file() and detect_layout(path) is not None


def read_step(path: Path) -> StepInfo:
    state = load_json(path / STATE_FILE) or {}
    check_types(path / STATE_FILE, state, {"global_step": is_count, "num_input_tokens_seen": is_count})
    check_log_history(path / STATE_FILE, state.get("log_history", []))
    lrs = [e["learning_rate"] for e in state.get("log_history", []) if "learning_rate" in e]
    return StepInfo(step=state.get("global_step", step_from_name(path, r"(\d+)$")),
                    tokens_seen=state.get("num_input_tokens_seen") or None,
                    lr=lrs[-1] if lrs else None, source=STATE_FILE)


LAYOUT = Layout("hf-trainer", detect, read_step, open_plain_checkpoint)
