"""An Azure Blob Storage server for the tests: Azurite (Microsoft's emulator, an npm package) on a free local port,
in a process of its own, started once per test module.

Azurite is found as ``azurite-blob`` on ``PATH``, else in ``$CKPTMERGE_TEST_CACHE/azurite`` (default
``~/.cache/ckptmerge-tests/azurite``), else installed there with ``npm install azurite@3`` (once, a few hundred
MB, at most ``NPM_TIMEOUT_S``). ``azure_server`` yields the blob endpoint; ``azure`` sets
``CKPTMERGE_STORAGE_OPTIONS`` (account name and a connection string with the emulator's well-known key) for the
test and returns an adlfs filesystem on the same server. Where adlfs, node/npm or Azurite is missing or the
server cannot start, it skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's, public
SECRET = KEY
AZURITE_SPEC = "azurite@3"
NPM_TIMEOUT_S = 300
START_TIMEOUT_S = 30


def _cache_dir() -> Path:
    return Path(os.environ.get("CKPTMERGE_TEST_CACHE", Path.home() / ".cache" / "ckptmerge-tests")) / "azurite"


def azurite_binary() -> str:
    """The ``azurite-blob`` executable, installed into the cache with npm when it is nowhere else; else skip."""
    found = shutil.which("azurite-blob")
    if found:
        return found
    cached = _cache_dir() / "node_modules" / ".bin" / "azurite-blob"
    if cached.is_file():
        return str(cached)
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("no Azure test server: Azurite needs node and npm (or azurite-blob on PATH), not found")
    _cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(_cache_dir()),
                               AZURITE_SPEC], capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"no Azure test server: npm install {AZURITE_SPEC} took over {NPM_TIMEOUT_S} s")
    if done.returncode != 0 or not cached.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"no Azure test server: npm install {AZURITE_SPEC} failed: {tail[0][:200]}")
    return str(cached)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def azure_server(tmp_path_factory):
    """``http://127.0.0.1:PORT/devstoreaccount1`` of a running Azurite blob server (stopped after the module)."""
    try:
        import adlfs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no Azure test server: {exc.name} is not installed (pip install 'ckptmerge[test]')")
    binary, port = azurite_binary(), _free_port()
    folder = tmp_path_factory.mktemp("azurite")
    # --skipApiVersionCheck: azure-storage-blob may speak a newer API version than this Azurite knows
    server = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(folder),
                               "--silent", "--skipApiVersionCheck", "--loose"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                err = server.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                pytest.skip(f"Azurite could not start on port {port}: {err[0][:200]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/{ACCOUNT}"
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def storage_options(endpoint: str) -> dict:
    """adlfs' keyword arguments: the account and a connection string holding its key (a secret, never printed)."""
    connection = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                  f"BlobEndpoint={endpoint};")
    return {"account_name": ACCOUNT, "connection_string": connection}


@pytest.fixture
def azure(azure_server, monkeypatch):
    """An adlfs filesystem on Azurite; the library sees the same server through the environment."""
    import adlfs

    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(storage_options(azure_server)))
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                 "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return adlfs.AzureBlobFileSystem(**storage_options(azure_server), skip_instance_cache=True)
