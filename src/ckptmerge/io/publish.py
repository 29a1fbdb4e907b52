"""Atomic publication of an output folder: build it beside the destination, then rename.

An interrupted or failed merge leaves nothing at the destination (the temporary folder is
removed on error; one left by a killed process is named ``.<dest>.tmp-*`` and never mistaken for
a checkpoint by discovery, which skips dot-names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptmerge.errors import OutputExistsError


def check_destination(dest: Path, force: bool) -> None:
    """Raise OutputExistsError now, before any work, if ``dest`` exists and ``force`` is off."""
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest}: already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest}: exists and is not a folder; remove it by hand")


@contextmanager
def atomic_folder(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` when the block exits without error."""
    dest = Path(dest)
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _fsync_folder(tmp)
        if dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, trash / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_path(dest.parent)  # the rename itself is durable only once the parent folder is synced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """Make every file of ``folder``, and the folder's own entries, durable."""
    for path in folder.iterdir():
        if path.is_file():
            _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
