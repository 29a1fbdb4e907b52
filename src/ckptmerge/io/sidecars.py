"""Copy the non-weight files that make a merged folder loadable (config, tokenizer, generation config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def copy_sidecars(source: Path, dest: Path, out_dtype: torch.dtype | None) -> list[str]:
    """Copy sidecar files from checkpoint folder ``source``; returns the names copied.

    When the output dtype was chosen explicitly, ``config.json``'s dtype field is updated to it.
    """
    if not source.is_dir():
        return []
    copied = []
    for name in SIDECAR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    if out_dtype is not None and "config.json" in copied:
        _set_config_dtype(dest / "config.json", _DTYPE_NAMES.get(out_dtype))
    return copied


def _set_config_dtype(path: Path, dtype_name: str | None) -> None:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return  # copied verbatim; not ours to repair
    for key in ("torch_dtype", "dtype"):
        if key in config and dtype_name:
            config[key] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
