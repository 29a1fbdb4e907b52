"""The C library's file and memory calls that Python's ``os`` module lacks: ``fallocate``,
``sync_file_range``, ``madvise``, ``renameat2`` and ``fstatfs`` (Linux).

Each binding is None where the C library lacks it; called, it returns the C result (0 on success,
-1 on failure) and leaves the failure's errno for ``last_errno()``. ctypes releases the GIL during
each call, so threads calling them run side by side. This is the one module that uses ctypes.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

AT_FDCWD = -100  # fcntl.h: paths relative to the working directory
RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14+


def _bind(name: str, argtypes: tuple) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


fallocate = _bind("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64))
sync_file_range = _bind("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
madvise = _bind("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
renameat2 = _bind("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
_fstatfs = _bind("fstatfs", (ctypes.c_int, ctypes.c_char_p)) if sys.platform == "linux" else None


def last_errno() -> int:
    """The errno of this thread's latest failed call above."""
    return ctypes.get_errno()


def filesystem_type(fd: int) -> int | None:
    """The ``statfs`` magic number of the filesystem holding ``fd`` (Linux), else None."""
    if _fstatfs is None:
        return None
    buffer = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux; f_type comes first
    if _fstatfs(fd, buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
