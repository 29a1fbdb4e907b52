"""Is a process of this host still running? Told by its pid and its start time, so that another process
that reuses the pid is not taken for it. Used for the owners of publishing's temporary folders
(``io/publish.py``) and the search workers' trial claims (``search/storage.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

UNKNOWN_START = "0"  # no /proc (not Linux), or no such process


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks after boot (Linux), ``UNKNOWN_START`` where unknown."""
    return process_state(pid)[1]


def process_state(pid: int) -> tuple[str, str]:
    """(state letter, start ticks) from ``/proc/PID/stat``; ("?", ``UNKNOWN_START``) where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "?", UNKNOWN_START


def process_alive(pid: int, start: str) -> bool:
    """False only when process ``pid`` of this host, started at ``start`` ticks, surely exited: no such pid,
    a zombie (killed, not yet reaped by its parent), or a process with another start time (a reused pid).
    Where either start time is unknown, the pid alone decides."""
    if pid <= 0:
        return True  # not one process: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    state, now = process_state(pid)
    if state in ("Z", "X"):
        return False
    return now == start or UNKNOWN_START in (now, start)
