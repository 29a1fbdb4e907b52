"""A GCS JSON API server for the tests: gcp-storage-emulator (``pip install gcp-storage-emulator``, the ``test``
extra), in memory on a free local port in this process, started once per test module.

``gcs_server`` yields the endpoint URL; ``gcs`` sets ``CKPTMERGE_STORAGE_OPTIONS`` for the test and returns a
gcsfs filesystem on the same server. Where gcsfs or the emulator is missing or the server cannot start, it skips
with the reason.

gcsfs (2025.10 and later) asks, by default, the Storage Control gRPC API for each bucket's type (zonal,
hierarchical) before using it; an emulator has no gRPC endpoint, so each bucket costs a 60 s timeout before gcsfs
falls back to its JSON API. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` turns that off; gcsfs reads it when it is
imported, so the fixture also registers gcsfs' plain ``GCSFileSystem`` for ``gs://`` while the server runs.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

PROJECT = "ckptmerge-test-project"
SECRET = "ckptmerge-test-GCS-SECRET-header"  # sent as a request header: a stand-in for a credential
ZB_HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"


@pytest.fixture(scope="module")
def gcs_server():
    """``http://127.0.0.1:PORT`` of a running in-memory GCS emulator (stopped after the module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ZB_HNS_ENV, "false")  # for this process's later imports and for subprocesses
        try:
            import gcsfs.core
            from gcp_storage_emulator.server import create_server
        except ImportError as exc:
            pytest.skip(f"no GCS test server: {exc.name} is not installed (pip install 'ckptmerge[test]')")
        registry = sys.modules["fsspec.registry"]._registry  # (``fsspec.registry`` is its read-only view)
        for protocol in ("gs", "gcs"):  # gcsfs may already be imported with the gRPC lookup on
            patch.setitem(registry, protocol, gcsfs.core.GCSFileSystem)
        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
        try:
            server = create_server("127.0.0.1", 0, in_memory=True)
            server.start()
            port = server._api._httpd.server_address[1]
        except Exception as exc:  # noqa: BLE001 - any failure to start is a skip with its reason
            pytest.skip(f"the GCS emulator could not start: {type(exc).__name__}: {exc}")
        yield f"http://127.0.0.1:{port}"
        server.stop()


def storage_options(endpoint: str) -> dict:
    """gcsfs' keyword arguments for the emulator: no credentials (``token="anon"``), a project for bucket
    creation, and a secret header that must never be printed."""
    return {"endpoint_url": endpoint, "token": "anon", "project": PROJECT,
            "session_kwargs": {"headers": {"x-ckptmerge-test-secret": SECRET}}}


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A gcsfs filesystem on the emulator; the library sees the same server through the environment."""
    import gcsfs.core

    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(storage_options(gcs_server)))
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    return gcsfs.core.GCSFileSystem(**storage_options(gcs_server), skip_instance_cache=True)
