"""A real S3 API server for the tests: moto's standalone server (``pip install 'moto[server]'``, the ``test``
extra) on a free local port, started once per test module, as s3fs's own test-suite does it.

``s3_endpoint`` yields the endpoint URL and sets ``CKPTMERGE_STORAGE_OPTIONS`` (endpoint, key, secret) for the
test; where moto or s3fs is missing or the server cannot start, it skips with the reason.
"""

from __future__ import annotations

import json
import os

import pytest

KEY, SECRET = "ckptmerge-test-key", "ckptmerge-test-SECRET-value"


@pytest.fixture(scope="module")
def s3_server():
    """``http://127.0.0.1:PORT`` of a running moto S3 server (stopped after the module)."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"no S3 test server: {exc.name} is not installed (pip install 'ckptmerge[test]')")
    try:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a skip with its reason
        pytest.skip(f"the moto S3 server could not start: {type(exc).__name__}: {exc}")
    yield f"http://{host}:{port}"
    server.stop()


def storage_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An s3fs filesystem on the test server; the library sees the same server through the environment."""
    import s3fs

    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(storage_options(s3_server)))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    fs = s3fs.S3FileSystem(**storage_options(s3_server), skip_instance_cache=True)
    return fs


def upload(fs, local, url_path: str) -> None:
    """Copy a local folder tree to ``bucket/prefix`` (the bucket is created when missing)."""
    bucket = url_path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(file), f"{url_path}/{file.relative_to(local).as_posix()}")
    os.sync()
