"""Copy the non-weight files that make a merged folder loadable (config, tokenizer, generation config).

    copied = copy_sidecars(newest_checkpoint, tmp, out_dtype)
    copied.names, copied.tokenizer_from   # merge.json records both

``config.json`` comes from the checkpoint folder. The tokenizer files and ``generation_config.json`` come
from the checkpoint folder, else from the run directory holding it (many trainers keep the tokenizer at the
run's root only), so a merge is evaluated with its tokenizer and no flags. Nothing is read from outside
those two folders: a sidecar that is a symlink resolving elsewhere is not copied, and a warning names it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptmerge.io.confine import is_inside

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "spiece.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
SIDECAR_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


@dataclass(frozen=True)
class CopiedSidecars:
    names: list[str]                          # the files copied into the output
    tokenizer_from: dict[str, str] | None     # {"folder": ..., "where": "checkpoint" | "run directory"}, or None


def copy_sidecars(source: Path, dest: Path, out_dtype: torch.dtype | None) -> CopiedSidecars:
    """Copy the sidecars of checkpoint ``source`` (a folder or a file) into ``dest``.

    When the output dtype was chosen explicitly, ``config.json``'s dtype field is updated to it.
    """
    source = Path(source)
    folders = {"checkpoint": source if source.is_dir() else None, "run directory": source.parent}
    names = _copy(folders["checkpoint"], dest, ("config.json",))
    tokenizer_where = _first(folders, lambda f: any((f / n).is_file() for n in TOKENIZER_MARKERS))
    if tokenizer_where is not None:
        names += _copy(folders[tokenizer_where], dest, TOKENIZER_FILES)
    generation_where = _first(folders, lambda f: (f / "generation_config.json").is_file())
    if generation_where is not None:
        names += _copy(folders[generation_where], dest, ("generation_config.json",))
    if out_dtype is not None and "config.json" in names:
        _set_config_dtype(dest / "config.json", _DTYPE_NAMES.get(out_dtype))
    tokenizer_from = None
    if tokenizer_where is not None and any(n in names for n in TOKENIZER_MARKERS):
        tokenizer_from = {"folder": str(folders[tokenizer_where]), "where": tokenizer_where}
    return CopiedSidecars(names, tokenizer_from)


def _first(folders: dict[str, Path | None], holds) -> str | None:
    return next((where for where, folder in folders.items() if folder is not None and holds(folder)), None)


def _copy(folder: Path | None, dest: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if folder is None or not (folder / name).is_file():
            continue
        if not is_inside(folder / name, folder):
            warnings.warn(f"{folder / name}: a symlink to {(folder / name).resolve()}, outside the folder {folder}; "
                          f"not copied into the output. Copy the file into the folder to include it.", stacklevel=3)
            continue
        shutil.copyfile(folder / name, dest / name)
        copied.append(name)
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
