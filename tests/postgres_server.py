"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, data in a temp folder,
a free local port, trust authentication, stopped and deleted at the end of the session.

``.ci/run`` installs the package (``apt-get install postgresql``) when it runs as root; where the binaries,
the driver or a non-root user to run the server are missing, ``postgres_url`` skips with the reason.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _skip_reason() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install psycopg[binary])"
    if _binary("initdb") is None or _binary("pg_ctl") is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
        if shutil.which("runuser") is None:
            return "running as root and 'runuser' is missing"
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a server started for this test session."""
    reason = _skip_reason()
    if reason:
        print(f"\nPostgreSQL tests skipped: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="ckptmerge-pg-"))
    data = root / "data"
    port = _free_port()
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    run = dict(capture_output=True, text=True, timeout=120)
    started = False
    try:
        init = subprocess.run(_as_server_user([_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                               "--no-sync"]), **run)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        start = subprocess.run(_as_server_user([_binary("pg_ctl"), "-D", str(data), "-o", options, "-l",
                                                str(root / "server.log"), "-w", "-t", "60", "start"]), **run)
        if start.returncode != 0:
            log = (root / "server.log").read_text()[-500:] if (root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()[-300:]} {log}")
        started = True
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\nPostgreSQL tests skipped: the server could not start: {exc}")
        pytest.skip(f"the PostgreSQL server could not start: {exc}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(_as_server_user([_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), **run)
        shutil.rmtree(root, ignore_errors=True)
