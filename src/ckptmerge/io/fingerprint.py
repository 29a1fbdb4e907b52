"""Content fingerprints of checkpoint files for provenance and caching.

``sampled`` (default) hashes each file's size plus 16 evenly spaced 64 KiB blocks (the whole file
when smaller than 1 MiB): a few MiB of I/O for any checkpoint, and any two checkpoints of a real
run differ in every block. ``full`` hashes every byte (one extra read of the inputs).

``pin_checkpoint`` is what a merge records: it hashes the checkpoint's weight files through
file descriptors it opened itself and remembers each file's identity (device, inode, size,
modification time). ``PinnedCheckpoint.verify`` re-checks the paths after the merge has read them:
if a file was replaced, modified, added or removed, or the folder vanished, the merge fails
instead of recording a hash of something it did not read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.layout import detect_layout
from ckptmerge.io.remote import as_location, is_url

BLOCK_BYTES = 64 * 1024
SAMPLED_BLOCKS = 16
HASH_MODES = ("sampled", "full", "none")


def fingerprint_files(files: list[Path], mode: str = "sampled") -> str | None:
    """``"<mode>-sha256:<hex>"`` over ``files`` (sorted by name), or None when mode is ``none``."""
    _check_mode(mode)
    if mode == "none":
        return None
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        fd = os.open(file, os.O_RDONLY)
        try:
            _hash_fd(digest, file.name, fd, os.fstat(fd).st_size, mode)
        finally:
            os.close(fd)
    return f"{mode}-sha256:{digest.hexdigest()}"


def checkpoint_files(path: Path) -> list[Path]:
    """Every regular file of a checkpoint (a file, or every file in its folder tree).

    A missing path is an error (never an empty list, whose hash would look like a real one).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: does not exist (moved or deleted?)")
    return sorted(p for p in path.rglob("*") if p.is_file())


def weight_files(path: Path) -> list[Path]:
    """The files a reader reads for checkpoint ``path``: weights, shard index, DCP metadata and data."""
    path = Path(path)
    found = detect_layout(path)
    if found is None and not os.path.lexists(path):
        raise CheckpointFormatError(f"{path}: does not exist (moved or deleted?); nothing was written. "
                                    f"Keep the inputs in place while merging.")
    if found is None and _is_framework_checkpoint(path):
        return checkpoint_files(path)  # a trainer's folder (DeepSpeed, litgpt, OLMo-core): all of its files
    if found is None:
        raise CheckpointFormatError(f"{path}: not a checkpoint ckptmerge can read (see `ckptmerge inspect`); "
                                    f"nothing was written")
    layout, files = found
    if layout == "dcp":
        return sorted([path / ".metadata", *path.glob("*.distcp")])
    indexes = [path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    return sorted({*files, *(i for i in indexes if path.is_dir() and i.is_file())})


def _is_framework_checkpoint(path: Path) -> bool:
    from ckptmerge.io.layouts import match_layout

    return match_layout(path) is not None


@dataclass(frozen=True)
class _Identity:
    name: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def _identity(path: Path, st: os.stat_result) -> _Identity:
    return _Identity(path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class PinnedCheckpoint:
    """A checkpoint's weight files as they were hashed: re-check with ``verify`` after reading them."""

    path: Path
    files: dict[Path, _Identity]
    fingerprint: str | None

    def verify(self) -> None:
        """Raise CheckpointFormatError if any file changed, appeared or disappeared since it was pinned."""
        try:
            now = {f: _identity(f, os.stat(f)) for f in weight_files(self.path)}
        except OSError as exc:
            now = {Path(exc.filename or self.path): None}
        if now != self.files:
            changed = sorted(str(f) for f in set(now) | set(self.files) if now.get(f) != self.files.get(f))
            raise CheckpointFormatError(f"{self.path}: changed while it was being merged ({', '.join(changed[:4])}); "
                                        f"nothing was written. Rerun the merge once the checkpoint is no longer modified.")


def pin_checkpoint(path: Path, mode: str = "sampled") -> PinnedCheckpoint:
    """Hash ``path``'s weight files through our own file descriptors and record their identities.
    A URL's objects are pinned by their ETags instead (``io/remote_layout.py``)."""
    _check_mode(mode)
    if is_url(path):
        from ckptmerge.io.remote_layout import pin_remote_checkpoint

        return pin_remote_checkpoint(as_location(path), mode)
    digest = hashlib.sha256()
    files = {}
    for file in sorted(weight_files(path), key=lambda p: p.name):
        fd = os.open(file, os.O_RDONLY)
        try:
            before = os.fstat(fd)
            if mode != "none":
                _hash_fd(digest, file.name, fd, before.st_size, mode)
            if _identity(file, os.fstat(fd)) != _identity(file, before):
                raise CheckpointFormatError(f"{file}: changed while it was being hashed; nothing was written. "
                                            f"Rerun the merge once the checkpoint is no longer modified.")
            files[file] = _identity(file, before)
        finally:
            os.close(fd)
    fingerprint = None if mode == "none" else f"{mode}-sha256:{digest.hexdigest()}"
    return PinnedCheckpoint(Path(path), files, fingerprint)


def _check_mode(mode: str) -> None:
    if mode not in HASH_MODES:
        raise ValueError(f"hash mode must be one of {HASH_MODES}, got {mode!r}")


def _hash_fd(digest, name: str, fd: int, size: int, mode: str) -> None:
    digest.update(f"{name}:{size}\n".encode())
    if mode == "full" or size <= BLOCK_BYTES * SAMPLED_BLOCKS:
        offset = 0
        while offset < size:
            block = os.pread(fd, min(1 << 22, size - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
    else:
        for k in range(SAMPLED_BLOCKS):
            digest.update(os.pread(fd, BLOCK_BYTES, (size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1)))
