"""Write an averaged model as one loadable checkpoint, from one process, DDP ranks or FSDP2 shards.

Two formats, chosen by ``Averager.save(..., format=...)``:

- ``"hf"``: one HF folder (``save_pretrained``; ``model.safetensors`` for plain modules). Under FSDP2 the
  shards are gathered on rank 0 with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, so
  rank 0 needs the whole model in CPU memory once; under DDP every rank already holds it and rank 0 writes.
- ``"dcp"``: a ``torch.distributed.checkpoint`` folder written by every rank together (each its own shards;
  replicated tensors once), keyed by the plain parameter names as torchtitan saves models, plus the HF
  ``config.json`` when the model has one. ``ckptmerge merge`` reads it through its DCP reader.

The averaged weights are swapped into the model for the write (and the training weights restored after), so
both formats hold the model's own names and dtypes. Every rank must call ``save`` (it is a collective);
rank 0 alone publishes the folder, atomically (``online/collective.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ckptmerge.errors import ConfigError
from ckptmerge.online.collective import publish_together
from ckptmerge.online.sharding import is_sharded, process_group

FORMATS = ("hf", "dcp")
META_FILE = "ckptmerge.json"


def save_averaged(averager, path: Path, model: torch.nn.Module, *, format: str, meta: dict) -> Path:
    """Publish ``averager``'s average of ``model`` at ``path`` in ``format`` ("hf" or "dcp")."""
    if format not in FORMATS:
        raise ConfigError(f"{path}: unknown save format {format!r}; use 'hf' (one HF folder, gathered on rank 0) "
                          f"or 'dcp' (a torch.distributed.checkpoint folder written by every rank)")
    averager.averaged_state_dict()  # no update yet: raise before any folder exists
    write = _write_hf if format == "hf" else _write_dcp
    return publish_together(Path(path), lambda tmp: write(tmp, averager, model, meta))


def _write_hf(tmp: Path, averager, model: torch.nn.Module, meta: dict) -> None:
    rank, _ = process_group()
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        with averager.swapped(model):  # a collective: every rank sends its shards to rank 0
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            _save_full(model, full, tmp)
    elif rank == 0:  # one process, or DDP: every rank holds the same whole average
        with averager.swapped(model):
            _save_whole(model, tmp)
    if rank == 0:
        _write_meta(tmp, meta)


def _write_dcp(tmp: Path, averager, model: torch.nn.Module, meta: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with averager.swapped(model):
        dcp.save(get_model_state_dict(model), checkpoint_id=tmp)
    if process_group()[0] == 0:
        if hasattr(model, "config") and hasattr(model.config, "to_json_file"):
            model.config.to_json_file(tmp / "config.json")
        _write_meta(tmp, meta)


def _save_whole(model: torch.nn.Module, tmp: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    else:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))


def _save_full(model: torch.nn.Module, full: dict[str, torch.Tensor], tmp: Path) -> None:
    """Write a gathered full state dict; tied weights (separate copies after the gather) are written once."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp, state_dict=full)
        return
    from safetensors.torch import save_file

    unique = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    save_file({k: v.contiguous() for k, v in full.items() if k not in aliases}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})


def _write_meta(tmp: Path, meta: dict) -> None:
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
