"""Keep every path that a checkpoint file names inside that checkpoint's folder.

A shard index, a DCP ``.metadata`` or a sidecar symlink is untrusted input: an absolute path, a
``..`` component or a symlink that resolves outside the folder would make ckptmerge read (and
merge, or copy into an output) another checkpoint's or the system's files. ``confined_path``
resolves symlinks first and then requires the result to lie inside the resolved folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ckptmerge.errors import CheckpointFormatError


def is_inside(path: Path, folder: Path) -> bool:
    """True when ``path``, with every symlink resolved, lies inside ``folder`` (also resolved)."""
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        return False


def confined_path(folder: Path, name: object, *, named_by: Path) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder``.

    Raises CheckpointFormatError naming ``named_by`` (the file that holds ``name``) otherwise.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointFormatError(f"{named_by}: names a file as {str(name)[:200]!r}, which is not a file name; "
                                    f"the file is corrupt. Re-export the checkpoint.")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or not is_inside(folder / name, folder):
        raise CheckpointFormatError(
            f"{named_by}: names {name[:200]!r}, which is outside the checkpoint folder {folder}; ckptmerge only reads "
            f"files inside the folder. Fix the file, or copy the data into the folder (symlinks must stay inside it too).")
    return folder / name
