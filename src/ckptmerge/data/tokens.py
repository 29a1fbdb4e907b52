"""Token files: ``ckptmerge data prepare`` and on-demand lookup of a domain, a text file or a .bin file.

Tokens are stored as flat uint16 arrays (nanoGPT's ``.bin``) under ``<cache>/tokens/byte/`` and
read back with ``np.memmap``, so a corpus is never loaded into memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ckptmerge.data.corpora import DOMAINS, cache_dir, domain_text
from ckptmerge.data.tokenizer import TOKEN_DTYPE, encode_bytes
from ckptmerge.errors import CkptMergeError
from ckptmerge.io.publish import atomic_file


def _write_tokens(path: Path, tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # owner-named: a killed writer's leftover is removed by the next one
        tmp.write_bytes(tokens.astype(TOKEN_DTYPE).tobytes())


def token_file(spec: str) -> Path:
    """The .bin of a built-in domain, of a text file (tokenized and cached), or a given .bin."""
    path = Path(spec)
    if spec in DOMAINS:
        out = cache_dir() / "tokens" / "byte" / f"{spec}.bin"
        if not out.is_file():
            _write_tokens(out, encode_bytes(domain_text(spec)))
        return out
    if path.suffix == ".bin" and path.is_file():
        return path
    if path.is_file():
        data = path.read_bytes()
        out = cache_dir() / "tokens" / "byte" / f"file-{hashlib.sha256(data).hexdigest()[:16]}.bin"
        if not out.is_file():
            _write_tokens(out, encode_bytes(data))
        return out
    raise CkptMergeError(f"--data {spec!r}: not a built-in domain ({', '.join(DOMAINS)}), "
                         f"a text file, or a token .bin file")


def load_tokens(spec: str) -> np.ndarray:
    """Read-only memmap of the tokens of ``spec`` (see ``token_file``)."""
    return np.memmap(token_file(spec), dtype=TOKEN_DTYPE, mode="r")


def prepare(domains: list[str] | None = None) -> dict[str, int]:
    """Build the token files of ``domains`` (default: all built-ins); returns token counts."""
    return {name: int(load_tokens(name).shape[0]) for name in (domains or list(DOMAINS))}
