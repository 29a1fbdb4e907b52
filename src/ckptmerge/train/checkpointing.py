"""Training checkpoints: an HF folder (weights, config, tokenizer) + ``ckptmerge.json`` + trainer state.

``RUN/step-000500/`` holds ``model.safetensors``, ``config.json``, ``generation_config.json``,
the tokenizer files, ``ckptmerge.json`` (step, tokens_seen, lr, train loss, grad norm, seed,
data position, parent) and ``trainer_state.pt`` (optimizer state and RNG states, plain tensors and
containers, read back with ``weights_only=True``). Each folder is published atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

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
    return json.loads((Path(folder) / META_FILE).read_text())


def load_trainer_state(folder: Path) -> dict | None:
    path = Path(folder) / TRAINER_STATE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


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
