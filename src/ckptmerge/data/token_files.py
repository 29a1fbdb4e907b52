"""Flat token files as nanoGPT writes them (``.bin``: raw uint16 or uint32 ids), ``.npy``, and their sidecars.

A ``.bin`` has no header, so its dtype comes from the sidecar ``FILE.bin.json`` that ``ckptmerge data
tokenize`` always writes (``{"dtype": "uint32", ...}``) or from ``--token-dtype``; a flag that contradicts
the sidecar is refused. With neither, the file is read as uint16 (nanoGPT's default) only when that is
consistent with the model (a vocabulary of at most 65,536 ids); a larger vocabulary is refused, naming
its size and ``--token-dtype``. A ``.npy`` carries its own dtype. Every uint16 read without a sidecar (by
default or by ``--token-dtype uint16``) is also checked on its first ids: a uint32 file read as uint16 shows
only the ids' high halves in the odd slots (zeros, or a few small values). Files are memory-mapped, never
read whole.
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
UINT16_IDS = 1 << 16
HIGH_HALF_LIMIT = 64  # high halves of uint32 ids below 4M
SPREAD_RATIO = 8  # low halves take at least this many times more distinct values


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_IDS else "uint32"


def read_token_file(path: str | Path, token_dtype: str | None = None, *, model_vocab: int | None = None) -> np.ndarray:
    """Read-only memmap of a ``.bin`` or ``.npy`` token file (1-D integer ids).

    ``model_vocab`` (the model's embedding rows, when a model reads the file) decides whether a ``.bin``
    without sidecar or flag may be read as uint16.
    """
    path = Path(path)
    if path.suffix == ".npy":
        return _read_npy(path, token_dtype)
    name = _bin_dtype(path, token_dtype, model_vocab)
    if name not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {name!r} is not one of {', '.join(TOKEN_DTYPES)}")
    itemsize = np.dtype(TOKEN_DTYPES[name]).itemsize
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"--data {path}: the token file is empty (0 bytes); nothing to score. Pass a file with tokens")
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {name} tokens; check --token-dtype")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[name], mode="r")
    if name == "uint16" and _sidecar_dtype(path) is None and _looks_like_uint32(tokens):  # even with the flag
        raise DataError(f"{path}: the odd uint16 slots hold only a few small values (the high halves of wider ids), "
                        "so this looks like a uint32 token file; pass --token-dtype uint32 (or, if it really holds "
                        f"16-bit ids, write the sidecar {sidecar_path(path).name} as {{\"dtype\": \"uint16\"}})")
    return tokens


def _read_npy(path: Path, token_dtype: str | None) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"{path}: a token .npy must be a 1-D integer array, not {array.dtype} {array.shape}")
    if token_dtype in TOKEN_DTYPES and array.dtype.itemsize != np.dtype(TOKEN_DTYPES[token_dtype]).itemsize:
        raise DataError(f"{path}: a .npy carries its dtype ({array.dtype}), which --token-dtype {token_dtype} "
                        "contradicts; drop --token-dtype (it is for .bin files)")
    if array.size == 0:
        raise DataError(f"--data {path}: the token file is empty (0 ids); nothing to score. Pass a file with tokens")
    return array


def _bin_dtype(path: Path, token_dtype: str | None, model_vocab: int | None) -> str:
    """The dtype to read ``path`` as: flag and sidecar (which must agree), else uint16 where the model allows it."""
    recorded = _sidecar_dtype(path)
    if token_dtype is not None and recorded is not None and token_dtype != recorded:
        raise DataError(f"{path}: --token-dtype {token_dtype} contradicts its sidecar {sidecar_path(path).name}, "
                        f"which says {recorded}; drop --token-dtype (or fix the sidecar if it is wrong)")
    declared = token_dtype or recorded
    if declared is not None:
        return declared
    if model_vocab is not None and model_vocab > UINT16_IDS:
        raise DataError(f"{path}: no sidecar {sidecar_path(path).name} says its id width, and the model's vocabulary "
                        f"of {model_vocab:,} ids does not fit uint16 (at most {UINT16_IDS:,}); pass --token-dtype "
                        "uint32 (or --token-dtype uint16 if the file really holds 16-bit ids)")
    return "uint16"


def _sidecar_dtype(path: Path) -> str | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        dtype = json.loads(sidecar.read_text()).get("dtype")
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{sidecar}: not a JSON object; fix or remove it, or pass --token-dtype") from None
    if dtype is not None and dtype not in TOKEN_DTYPES:
        raise DataError(f"{sidecar}: dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}; fix or remove it")
    return dtype


def _looks_like_uint32(tokens: np.ndarray) -> bool:
    """A uint32 file read as uint16: the odd slots (high halves) are all zero, or a few small values
    (ids of 65,536 and up) while the even slots (low halves) spread wide. Real uint16 ids look alike in both."""
    head = np.asarray(tokens[:SNIFF_TOKENS])
    if len(head) < 64:
        return False
    low, high = head[0::2], head[1::2]
    if not high.any():
        return bool(low.any())
    return int(high.max()) < HIGH_HALF_LIMIT <= int(low.max()) and \
        len(np.unique(high)) * SPREAD_RATIO <= len(np.unique(low))


def check_ids_below(tokens, limit: int, *, data: str, what: str) -> None:
    """Refuse an id at or above ``limit`` (``what``: e.g. "the tokenizer's vocabulary of 320 (tok/)")."""
    top = int(tokens.max()) if len(tokens) else -1  # a numpy array or a torch tensor
    if top >= limit:
        raise DataError(f"--data {data}: token id {top} is outside {what}; the data was tokenized with another "
                        "tokenizer (or read with the wrong --token-dtype)")


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
