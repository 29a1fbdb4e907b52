"""Training checkpoints: an HF folder (weights, config, tokenizer) + ``ckptmerge.json`` + trainer state.

``RUN/step-000500/`` holds ``model.safetensors``, ``config.json``, ``generation_config.json``,
the tokenizer files, ``ckptmerge.json`` (step, tokens_seen, lr, train loss, grad norm, seed,
data position, parent) and ``trainer_state.pt`` (optimizer state and RNG states, plain tensors and
containers, read back with ``weights_only=True``). Each folder is published atomically.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmerge.io.publish import atomic_folder
from ckptmerge.merging.discover import META_FILE

TRAINER_STATE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                    tokenizer_dir: Path | None, averagers: dict | None = None) -> None:
    """Publish one checkpoint; each online averager's model goes to ``folder/<name>/`` (an HF folder)."""
    averagers = {k: a for k, a in (averagers or {}).items() if a.n_averaged}
    with atomic_folder(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:
            for file in tokenizer_dir.iterdir():
                shutil.copyfile(file, tmp / file.name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, averager in averagers.items():
            averager.save(tmp / name, model, extra_meta={"parent": meta.get("parent")})
            if tokenizer_dir is not None:
                for file in tokenizer_dir.iterdir():
                    shutil.copyfile(file, tmp / name / file.name)
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "averagers": {k: a.state_dict() for k, a in averagers.items()}}, tmp / TRAINER_STATE)


def read_meta(folder: Path) -> dict:
    """``ckptmerge.json`` of a training checkpoint; CheckpointFormatError when unreadable or without a step."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{path}: not valid JSON ({str(exc)[:200]}); restore it or remove the checkpoint") from exc
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointFormatError(f"{path}: needs an integer 'step'; restore it or remove the checkpoint")
    return meta


def load_trainer_state(folder: Path) -> dict | None:
    """Optimizer / RNG / averager state, loaded with ``weights_only=True``; None when the checkpoint has none."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refusing to load: it needs arbitrary unpickling "
                                    f"({str(exc).splitlines()[0][:200]}); nothing from it was executed. "
                                    f"Remove the file to resume from an older checkpoint.") from exc
    except Exception as exc:  # truncated or corrupt: RuntimeError, EOFError, ValueError, ...
        raise CheckpointFormatError(f"{path}: cannot read trainer state ({type(exc).__name__}: {str(exc)[:200]}); "
                                    f"remove the file to resume from an older checkpoint") from exc
    if not isinstance(state, dict) or not {"optimizer", "torch_rng"} <= set(state):
        raise CheckpointFormatError(f"{path}: not a ckptmerge trainer state (needs optimizer and torch_rng); "
                                    f"remove the file to resume from an older checkpoint")
    return state


def latest_resumable(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of ``run_dir`` that has trainer state."""
    candidates = [p for p in Path(run_dir).glob("step-*") if (p / TRAINER_STATE).is_file() and (p / META_FILE).is_file()]
    return max(candidates, key=lambda p: read_meta(p)["step"], default=None)


def prune_trainer_states(run_dir: Path, keep: int) -> None:
    """Delete ``trainer_state.pt`` from all but the newest ``keep`` checkpoints (weights stay; resume still works)."""
    with_state = sorted((p for p in Path(run_dir).glob("step-*") if (p / TRAINER_STATE).is_file()),
                        key=lambda p: read_meta(p)["step"])
    for folder in with_state[:-keep]:
        (folder / TRAINER_STATE).unlink()
