"""Build the model to evaluate: an HF folder, or a raw ``.pt`` / DCP checkpoint on a given architecture.

    model = load_model("runs/hf/checkpoint-400", device="cuda", dtype="bfloat16")
    model = load_model("ckpts/step_1000.pt", model_config="configs/gpt2-small")       # HF config folder
    model = load_model("dcp/step-1000", model_factory="mypkg.model:build", key_map=["^blocks=layers"])

Weights are read in fp32 and then cast to ``dtype`` on ``device``. Everything is read from local
files (``local_files_only``): a mistyped path is an error naming it, never a model-hub request.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.errors import ModelLoadError
from ckptmerge.evaluation.devices import resolve_device, resolve_dtype
from ckptmerge.evaluation.keymap import fit_state, parse_key_map
from ckptmerge.io.dispatch import open_checkpoint


def load_model(path, *, device: str | torch.device | None = "cpu", dtype: str | torch.dtype = "float32",
               model_config: str | Path | None = None, model_factory: str | None = None,
               key_map: Sequence[str] = (), device_map: str | None = None) -> torch.nn.Module:
    """The model at ``path`` in eval mode, on ``device`` in ``dtype``.

    ``device_map="auto"`` (accelerate) spreads an HF model too large for one device over all visible devices.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such checkpoint file or folder (models load from local paths only)")
    if model_factory or model_config:
        model = build_model(model_config=model_config, model_factory=model_factory)
        load_weights(model, path, key_map=key_map)
    elif (path / "config.json").is_file():
        model = _from_pretrained(path, device_map=device_map)
        if device_map is not None:
            return model.to(dtype=resolve_dtype(dtype)).eval()
    else:
        raise ModelLoadError(f"{path}: no config.json, so the architecture is unknown; pass --model-config DIR "
                             "(an HF config folder) or --model-factory package.module:function")
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()


def _from_pretrained(path: Path, device_map: str | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load is noise in sweeps and searches
    open_checkpoint(path).close()  # our strict readers check headers, indexes and paths first: a hostile
    try:                           # folder fails with our one-line error, not inside transformers
        extra = {"device_map": device_map} if device_map is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: transformers cannot load this folder as a causal LM "
                             f"({str(exc).splitlines()[0]})") from None


def build_model(*, model_config: str | Path | None = None, model_factory: str | None = None) -> torch.nn.Module:
    """A freshly initialised fp32 model from an HF config folder or a ``package.module:function`` factory."""
    if model_factory:
        return _call_factory(model_factory)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_config)
    if not (folder / "config.json").is_file() and not folder.name.endswith(".json"):
        raise ModelLoadError(f"--model-config {folder}: no config.json there (an HF config folder is needed)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"--model-config {folder}: not a config transformers can read "
                             f"({str(exc).splitlines()[0]})") from None
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _call_factory(spec: str) -> torch.nn.Module:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ModelLoadError(f"--model-factory {spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: factories usually live in the user's project
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"--model-factory {spec}: cannot import it ({exc})") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"--model-factory {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model.float()


def load_weights(model: torch.nn.Module, path: str | Path, *, key_map: Sequence[str] = ()) -> None:
    """Copy the tensors of the checkpoint at ``path`` (any layout ckptmerge reads) into ``model``."""
    reader = open_checkpoint(path)
    try:
        state = {k: reader.get(k) for k in reader.keys()}
        load_state_into(model, fit_state(state, model, key_map=parse_key_map(key_map), source=str(path)))
    finally:
        reader.close()


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place, casting to its device and dtype (tied weights may be given once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {k for k in missing if k in params and any(p is params[k] for o, p in params.items() if o in state)}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:8]}, "
                             f"unexpected {sorted(unexpected)[:8]}")


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the input embedding (the ids the model accepts), when it can be found."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return int(embedding.num_embeddings) if embedding is not None else None
