"""Content fingerprints of checkpoint files for provenance and caching.

``sampled`` (default) hashes each file's size plus 16 evenly spaced 64 KiB blocks (the whole file
when smaller than 1 MiB): a few MiB of I/O for any checkpoint, and any two checkpoints of a real
run differ in every block. ``full`` hashes every byte (one extra read of the inputs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 64 * 1024
SAMPLED_BLOCKS = 16
HASH_MODES = ("sampled", "full", "none")


def fingerprint_files(files: list[Path], mode: str = "sampled") -> str | None:
    """``"<mode>-sha256:<hex>"`` over ``files`` (sorted by name), or None when mode is ``none``."""
    if mode == "none":
        return None
    if mode not in HASH_MODES:
        raise ValueError(f"hash mode must be one of {HASH_MODES}, got {mode!r}")
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            if mode == "full" or size <= BLOCK_BYTES * SAMPLED_BLOCKS:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            else:
                for k in range(SAMPLED_BLOCKS):
                    f.seek((size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1))
                    digest.update(f.read(BLOCK_BYTES))
    return f"{mode}-sha256:{digest.hexdigest()}"


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint (a file, or every regular file in its folder tree)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())
