"""``--storage-options JSON`` and ``--io-concurrency N``: how commands reach URLs (``s3://``, ``gs://``, ...).

Each flag sets its environment variable (``CKPTMERGE_STORAGE_OPTIONS``, ``CKPTMERGE_IO_CONCURRENCY``) for this
process and the processes it starts (torchrun ranks, sweep workers), so the library reads one place.
"""

from __future__ import annotations

import argparse
import os

from ckptmerge.io.remote import CONCURRENCY_ENV, OPTIONS_ENV, io_concurrency, storage_options


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote storage (s3://, gs://, az://, any fsspec URL)")
    g.add_argument("--storage-options", metavar="JSON",
                   help=f"keyword arguments for the fsspec filesystem, e.g. '{{\"endpoint_url\": "
                        f"\"http://localhost:9000\"}}' or '{{\"profile\": \"train\"}}' (also {OPTIONS_ENV}); "
                        f"credentials otherwise come from the backend's usual places. Values are never printed")
    g.add_argument("--io-concurrency", type=int, metavar="N",
                   help=f"range requests in flight per remote checkpoint (default 8; also {CONCURRENCY_ENV})")


def apply_storage_flags(args: argparse.Namespace) -> None:
    """Export the flags given, and check both settings now (a bad JSON is one line before any work)."""
    if getattr(args, "storage_options", None) is not None:
        os.environ[OPTIONS_ENV] = args.storage_options
    if getattr(args, "io_concurrency", None) is not None:
        os.environ[CONCURRENCY_ENV] = str(args.io_concurrency)
    storage_options()
    io_concurrency()
