"""Keep the checkpoints a watch still needs after the trainer deletes them (``save_total_limit``, ``keep_last_n``).

Each checkpoint a window method may still merge is mirrored under ``OUT/.retained/`` at its path relative to
the run directory, as hard links: a link costs no disk space while the trainer's copy exists, and keeps the
bytes once the trainer deletes its copy. Where hard links are impossible (another filesystem), the files are
copied. A merge reads the trainer's copy while it exists and the retained one after it is gone: the same
bytes, so the same result. A retained checkpoint is dropped as soon as no method's window can reach it.

Trainers write a step's checkpoint once and never rewrite it in place (they write the next step's), so a
link made after the checkpoint settled sees exactly the bytes that were merged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ckptmerge.io.fingerprint import checkpoint_files
from ckptmerge.io.publish import atomic_folder

RETAINED = ".retained"


def retained_path(path: Path, run_dir: Path, out: Path) -> Path:
    """Where ``path`` (a checkpoint inside ``run_dir``) is mirrored under ``out``."""
    return out / RETAINED / Path(path).relative_to(run_dir)


def retain(path: Path, run_dir: Path, out: Path) -> Path:
    """Mirror checkpoint ``path`` (file or folder) under ``out/.retained``; returns the mirror's path."""
    path, dest = Path(path), retained_path(path, run_dir, out)
    if dest.exists():
        return dest
    if path.is_dir():
        with atomic_folder(dest) as tmp:
            for file in checkpoint_files(path):
                target = tmp / file.relative_to(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(file, target)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        partial.unlink(missing_ok=True)
        _link_or_copy(path, partial)
        os.replace(partial, dest)
    return dest


def readable_path(path: Path, run_dir: Path, out: Path) -> Path:
    """The trainer's copy while it exists, else the retained mirror."""
    return Path(path) if Path(path).exists() else retained_path(path, run_dir, out)


def release(path: Path, run_dir: Path, out: Path) -> None:
    """Drop the mirror of ``path`` (no window reaches it any more) and the folders it leaves empty."""
    dest, root = retained_path(path, run_dir, out), out / RETAINED
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
    else:
        dest.unlink(missing_ok=True)
    parent = dest.parent
    while parent != root and parent.is_relative_to(root) and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copyfile(source, target)
