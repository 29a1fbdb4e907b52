"""Tiny checkpoint series written with the reference libraries (safetensors, torch.save, DCP), never ckptmerge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_state(seed: int, dtype: torch.dtype = torch.float32, step: int = 0) -> dict[str, torch.Tensor]:
    """A small model-like state dict: float weights of several shapes, a 0-d tensor, int and bool buffers."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 8, generator=g).to(dtype),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(dtype),
        "layers.0.attn.bias": torch.randn(8, generator=g).to(dtype),
        "layers.1.mlp.weight": torch.randn(16, 8, generator=g).to(dtype),
        "norm.scale": torch.randn((), generator=g).to(dtype),
        "buffers.position_ids": torch.arange(12, dtype=torch.int64),
        "buffers.mask": torch.tensor([True, False, True, True]),
        "buffers.step": torch.tensor([step], dtype=torch.int64),
    }


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def reference_merge(states: list[dict[str, torch.Tensor]], coeffs: list[float]) -> dict[str, np.ndarray]:
    """Independent fp64 NumPy weighted average of float tensors (non-float: the newest's value)."""
    out = {}
    for name, newest in states[-1].items():
        if newest.dtype.is_floating_point:
            out[name] = sum(np.float64(c) * to_f64(s[name]) for c, s in zip(coeffs, states))
        else:
            out[name] = newest.numpy()
    return out


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], layout: str) -> Path:
    """Write ``state`` at ``path`` in one of the layouts users have; returns the checkpoint path."""
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "hf-safetensors":
        path.mkdir(parents=True)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    elif layout == "hf-sharded":
        path.mkdir(parents=True)
        names = sorted(state)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, path / fname)
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "hf-bin":
        path.mkdir(parents=True)
        torch.save(state, path / "pytorch_model.bin")
    elif layout == "safetensors-file":
        path = path.with_suffix(".safetensors")
        save_file(state, path)
    elif layout == "pt-nested":  # a training checkpoint: DDP + compile prefixes, optimizer beside the model
        path = path.with_suffix(".pt")
        model = {f"module._orig_mod.{k}": v for k, v in state.items()}
        torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 5}, path)
    elif layout == "dcp":
        import torch.distributed.checkpoint as dcp

        path.mkdir(parents=True)
        optim = {"optimizer.state.embed.weight.exp_avg": torch.zeros(3)}
        dcp.save({**{f"model.{k}": v for k, v in state.items()}, **optim}, checkpoint_id=str(path), no_dist=True)
    else:
        raise ValueError(layout)
    return path


def write_series(run_dir: Path, states: list[dict[str, torch.Tensor]], layout: str = "hf-safetensors",
                 steps: list[int] | None = None, name: str = "step-{step:06d}") -> list[Path]:
    steps = steps or [100 * (i + 1) for i in range(len(states))]
    run_dir.mkdir(parents=True, exist_ok=True)
    return [write_checkpoint(run_dir / name.format(step=s), st, layout) for s, st in zip(steps, states)]


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def series(tmp_path):
    """Four fp32 checkpoints as HF safetensors folders: (run_dir, states, paths)."""
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(4)]
    paths = write_series(tmp_path / "run", states)
    return tmp_path / "run", states, paths


def write_word_corpus(root: Path) -> None:
    """``train.txt``, ``val.txt`` and ``other.txt`` (a narrower vocabulary) of random words, seeded, in ``root``;
    the cache of tokenized text goes to ``root/cache``."""
    import os

    os.environ["CKPTMERGE_CACHE"] = str(root / "cache")
    rng = np.random.default_rng(0)
    words = ["the", "king", "doth", "speak", "and", "queen", "answers", "thee", "not", "so"]
    (root / "train.txt").write_text(" ".join(rng.choice(words, 20000)))
    (root / "val.txt").write_text(" ".join(rng.choice(words, 4000)))
    (root / "other.txt").write_text(" ".join(rng.choice(words[:4], 4000)))
