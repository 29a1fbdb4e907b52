"""Local copies of the small things an evaluation needs from an object store, kept in the cache.

    cached_object(Url("s3", "bucket/data/held.jsonl"))   # $CKPTMERGE_CACHE/remote/<hash of URL and ETag>/held.jsonl
    cached_sidecars(Url("s3", "bucket/run/checkpoint-400"))  # a local folder with its config and tokenizer

A data file is fetched whole, once per version (its ETag is part of the cache key, so a replaced object is
fetched again); a checkpoint's sidecars are fetched again on each use (a few small files). Weights are never
copied: they are read by byte ranges (``io/remote_safetensors.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_sidecars import mirror_sidecars
from ckptmerge.io.remote_tree import RemoteTree


def cache_root() -> Path:
    """``$CKPTMERGE_CACHE/remote``, else ``~/.cache/ckptmerge/remote`` (the cache of ``data/corpora.py``)."""
    return Path(os.environ.get("CKPTMERGE_CACHE", Path.home() / ".cache" / "ckptmerge")) / "remote"


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cached_object(url: Url) -> Path:
    """A local copy of the object at ``url``, fetched when the cache has no copy of its current version."""
    tree = RemoteTree.list(url)
    if not tree.is_file(""):
        raise FileNotFoundError(2, "no such object (a data file is one object, not a folder)", str(url))
    obj = tree.object("")
    local = cache_root() / _key(str(url), obj.version) / url.name
    if local.is_file() and local.stat().st_size == obj.size:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
    with remote_errors(url, "read"):
        tree.fs.get_file(url.path, str(partial))
    os.replace(partial, local)
    return local


def cached_sidecars(url: Url) -> Path:
    """A local stand-in for checkpoint ``url``: its config and tokenizer files (and the run's), no weights."""
    return mirror_sidecars(url, cache_root() / _key(str(url)))
