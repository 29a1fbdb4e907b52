"""Flat token files as nanoGPT writes them (``.bin``: raw uint16 or uint32 ids), ``.npy``, and their sidecars.

A ``.bin`` has no header, so its dtype comes from ``--token-dtype``, else from the sidecar
``FILE.bin.json`` that ``ckptmerge data tokenize`` writes (``{"dtype": "uint32", ...}``), else uint16
(nanoGPT's default). A uint32 file read as uint16 shows a zero in every odd slot; that is refused
with a message naming the flag. Files are memory-mapped, never read whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ckptmerge.errors import DataError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SNIFF_TOKENS = 4096


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_token_file(path: str | Path, token_dtype: str | None = None) -> np.ndarray:
    """Read-only memmap of a ``.bin`` or ``.npy`` token file (1-D integer ids)."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise DataError(f"{path}: a token .npy must be a 1-D integer array, not {array.dtype} {array.shape}")
        return array
    declared = token_dtype or _sidecar_dtype(path)
    name = declared or "uint16"
    if name not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {name!r} is not one of {', '.join(TOKEN_DTYPES)}")
    itemsize = np.dtype(TOKEN_DTYPES[name]).itemsize
    size = path.stat().st_size
    if size == 0 or size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {name} tokens; check --token-dtype")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[name], mode="r")
    if declared is None and _looks_like_uint32(tokens):
        raise DataError(f"{path}: every second uint16 is zero, so this looks like a uint32 token file; "
                        "pass --token-dtype uint32 (or --token-dtype uint16 to read it as it is)")
    return tokens


def _sidecar_dtype(path: Path) -> str | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text()).get("dtype")
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{sidecar}: not a JSON object; fix or remove it, or pass --token-dtype") from None


def _looks_like_uint32(tokens: np.ndarray) -> bool:
    head = np.asarray(tokens[:SNIFF_TOKENS])
    return len(head) >= 64 and not head[1::2].any() and head[0::2].any()


def write_token_file(path: str | Path, chunks: Iterable[np.ndarray], *, dtype: str, about: dict) -> int:
    """Stream ``chunks`` of ids into ``path`` (atomically, with its sidecar); returns the token count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = np.iinfo(TOKEN_DTYPES[dtype]).max
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                if len(chunk) and int(chunk.max()) > limit:
                    raise DataError(f"{path}: token id {int(chunk.max())} does not fit {dtype}; use uint32")
                f.write(np.asarray(chunk).astype(TOKEN_DTYPES[dtype]).tobytes())
                count += len(chunk)
        _write_json_atomic(sidecar_path(path), {"dtype": dtype, "tokens": count, **about})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
