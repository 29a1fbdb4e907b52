"""Crash-safe publication of an output folder: build it beside the destination, then rename it in.

The API, used by merges, training checkpoints, ``watch``'s ``current/`` and reports:

- ``check_destination(dest, force)``: fail fast, before any work, when ``dest`` exists.
- ``atomic_folder(dest, force=...)``: a context manager yielding a temporary folder that becomes
  ``dest`` when the block exits without error, and is removed when it raises.
- ``atomic_file(path)`` / ``write_text_atomic(path, text)``: the same for one file (configs, state).
- ``remove_stale(folder, name=None)`` / ``clean_tree(path)``: delete temporaries whose owner died.

Guarantees:

- **Nothing half-written at ``dest``.** The temporary is named ``.<dest>.tmp-<pid>-<start>-<host>-<rand>``:
  discovery skips dot-names, and the name records its owner (process id, the process's start time
  and a hash of the host name). A ``kill -9`` leaves it behind; the next publish into the same
  folder, and ``ckptmerge clean``, remove it once that process is gone (a reused pid has another
  start time; a killed process not yet reaped counts as gone). Temporaries of live processes and of other hosts are never touched.
- **No lost race.** The final step runs under an exclusive ``flock`` on the destination's parent
  folder: if ``dest`` appeared while the output was being written (another merge), publishing
  refuses with ``OutputExistsError`` unless ``force``; two publishers to one destination never both
  succeed without ``force``. Without ``force`` the rename cannot replace anything
  (``RENAME_NOREPLACE``); with ``force`` the old folder is swapped out atomically
  (``RENAME_EXCHANGE``), so ``dest`` never disappears, then deleted.
- **Ordinary permissions.** Folders are created with mode 0o777 minus the umask, like ``mkdir``.
- **Durable.** Every file and folder is fsynced before the rename, and the parent after it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptmerge.errors import OutputExistsError
from ckptmerge.io import libc
from ckptmerge.io.process_liveness import process_alive, start_ticks

TMP_KIND, OLD_KIND = "tmp", "old"
_NAME_CHARS = 120  # keeps temporary names under the 255-byte limit
_TEMP_RE = re.compile(r"^\.(?P<name>.*)\.(?:tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$")


def check_destination(dest: Path, force: bool) -> None:
    """Raise OutputExistsError now, before any work, if ``dest`` exists and ``force`` is off."""
    dest = Path(dest)
    if os.path.lexists(dest) and not force:
        raise OutputExistsError(f"{dest}: already exists; pass --force to replace it")
    if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
        raise OutputExistsError(f"{dest}: exists and is not a folder; remove it by hand")


@contextmanager
def atomic_folder(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` when the block exits without error.

    Raises OutputExistsError (before the block, or at the end when ``dest`` appeared meanwhile)
    unless ``force``; OSError when the parent cannot be created or written.
    """
    dest = Path(dest)
    check_destination(dest, force)
    created = _make_parents(dest.parent)
    try:
        remove_stale(dest.parent)  # any dead owner's leftovers here, this destination's first of all
        tmp = _make_temp_folder(dest.parent, dest.name)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, dest, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest last."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_empty(folders: list[Path]) -> None:
    """Undo ``_make_parents`` after a failure: remove the folders it created that are still empty."""
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            return


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path (same folder, owner-named) that replaces ``path`` when the block succeeds."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    tmp = path.parent / temp_name(path.name, TMP_KIND)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a killed writer leaves the old file and a stale temporary)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def temp_name(dest_name: str, kind: str = TMP_KIND) -> str:
    """``.<dest>.<kind>-<pid>-<start>-<host>-<random>``: a hidden name that records its owner."""
    return f".{dest_name[:_NAME_CHARS]}.{kind}-{os.getpid()}-{start_ticks(os.getpid())}-{_host_id()}-{secrets.token_hex(4)}"


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Delete temporaries in ``folder`` (for destination ``name``, or all) whose owner is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or (name is not None and match["name"] != name[:_NAME_CHARS]):
            continue
        if not owner_alive(int(match["pid"]), match["start"], match["host"]):
            _remove(entry)
            removed.append(entry)
    return removed


def clean_tree(path: Path) -> list[Path]:
    """Remove dead owners' temporaries anywhere under folder ``path``, and those beside it for ``path`` itself."""
    path = Path(path)
    removed = remove_stale(path.parent, path.name)
    if path.is_dir() and not path.is_symlink():
        for folder, subfolders, _files in os.walk(path):
            removed += remove_stale(Path(folder))
            subfolders[:] = [d for d in subfolders if not _TEMP_RE.match(d)]
    return removed


def owner_alive(pid: int, start: str, host: str) -> bool:
    """False only when the owner surely exited: same host, and no process with that pid and start time."""
    if host != _host_id():
        return True  # another machine's process: cannot tell, keep its files
    return process_alive(pid, start)


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _make_temp_folder(parent: Path, dest_name: str) -> Path:
    while True:
        tmp = parent / temp_name(dest_name)
        try:
            tmp.mkdir(mode=0o777)  # the umask applies, as for any mkdir (mkdtemp would force 0700)
            return tmp
        except FileExistsError:
            continue


def _publish(tmp: Path, dest: Path, force: bool) -> None:
    with _locked(dest.parent):
        if os.path.lexists(dest) and not force:
            raise OutputExistsError(f"{dest}: appeared while this output was being written (another run?); "
                                    f"it was left as it is and nothing was published. Pass --force to replace it.")
        if os.path.lexists(dest):
            check_destination(dest, force=True)
            if not _rename2(tmp, dest, libc.RENAME_EXCHANGE):
                old = dest.parent / temp_name(dest.name, OLD_KIND)
                os.rename(dest, old)
                os.rename(tmp, dest)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the replaced output
        else:
            _rename_new(tmp, dest)
        _fsync_path(dest.parent)


def _rename_new(tmp: Path, dest: Path) -> None:
    try:
        if not _rename2(tmp, dest, libc.RENAME_NOREPLACE):
            os.rename(tmp, dest)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise OutputExistsError(f"{dest}: appeared while this output was being written; nothing was published. "
                                f"Pass --force to replace it.") from exc
    except OSError as exc:
        if exc.errno == 39:  # ENOTEMPTY: a folder appeared there
            raise OutputExistsError(f"{dest}: appeared while this output was being written; nothing was "
                                    f"published. Pass --force to replace it.") from exc
        raise


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the kernel, libc or filesystem lacks it (caller falls back)."""
    if libc.renameat2 is None:
        return False
    if libc.renameat2(libc.AT_FDCWD, os.fsencode(src), libc.AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    errno = libc.last_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: flag unsupported here
        return False
    raise OSError(errno, os.strerror(errno), str(src), None, str(dst))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``folder`` itself (no lock file to leave behind); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_path(Path(root))


def _fsync_path(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder
    finally:
        os.close(fd)
