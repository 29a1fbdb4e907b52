"""Process liveness (io/process_liveness.py), the one check behind publishing's stale temporaries and the
search workers' claims: the operating system's own view of a child process (``Popen.poll``) is the reference."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from ckptmerge.io.process_liveness import UNKNOWN_START, process_alive, process_state, start_ticks
from ckptmerge.search.storage import worker_gone, worker_id

LINUX_PROC = os.path.isdir("/proc/self")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_running_process_is_alive_with_its_start_time_or_an_unknown_one():
    assert process_alive(os.getpid(), start_ticks(os.getpid()))
    assert process_alive(os.getpid(), UNKNOWN_START)


def test_an_exited_and_reaped_process_is_gone():
    assert not process_alive(_exited_pid(), UNKNOWN_START)


@pytest.mark.skipif(not LINUX_PROC, reason="start times come from /proc")
def test_a_reused_pid_is_not_the_process_that_was_recorded():
    recorded = str(int(start_ticks(os.getpid())) + 1)  # this pid, started at another time
    assert not process_alive(os.getpid(), recorded)


@pytest.mark.skipif(not LINUX_PROC, reason="process states come from /proc")
def test_a_killed_but_unreaped_process_is_gone():
    proc = _sleeper()
    try:
        while start_ticks(proc.pid) == UNKNOWN_START and proc.poll() is None:
            pass
        start = start_ticks(proc.pid)
        assert process_alive(proc.pid, start)
        os.kill(proc.pid, signal.SIGKILL)
        while process_state(proc.pid)[0] not in ("Z", "X", "?"):
            pass
        assert not process_alive(proc.pid, start)  # a zombie until wait()
    finally:
        proc.kill()
        proc.wait()


def test_search_workers_use_the_same_check():
    assert not worker_gone(worker_id())
    assert worker_gone(f"{socket.gethostname()}:{_exited_pid()}:{UNKNOWN_START}")
    assert not worker_gone(f"another-host-{socket.gethostname()}:{_exited_pid()}:{UNKNOWN_START}")
