"""Copy the non-weight files that make a merged folder loadable (config, tokenizer, generation config)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from ckptmerge.io.confine import is_inside

SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def copy_sidecars(source: Path, dest: Path, out_dtype: torch.dtype | None) -> list[str]:
    """Copy sidecar files from checkpoint folder ``source``; returns the names copied.

    When the output dtype was chosen explicitly, ``config.json``'s dtype field is updated to it.
    A sidecar that is a symlink resolving outside ``source`` is not copied (it would leak another
    file into the output); a warning names it.
    """
    if not source.is_dir():
        return []
    copied = []
    for name in SIDECAR_FILES:
        if not (source / name).is_file():
            continue
        if not is_inside(source / name, source):
            warnings.warn(f"{source / name}: a symlink to {(source / name).resolve()}, outside the checkpoint "
                          f"folder; not copied into the output. Copy the file into the folder to include it.",
                          stacklevel=2)
            continue
        shutil.copyfile(source / name, dest / name)
        copied.append(name)
    if out_dtype is not None and "config.json" in copied:
        _set_config_dtype(dest / "config.json", _DTYPE_NAMES.get(out_dtype))
    return copied


def _set_config_dtype(path: Path, dtype_name: str | None) -> None:
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        return  # copied verbatim; not ours to repair
    if not isinstance(config, dict):
        return
    for key in ("torch_dtype", "dtype"):
        if key in config and dtype_name:
            config[key] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
