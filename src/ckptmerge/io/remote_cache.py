"""Local copies of the small things an evaluation needs from an object store, kept in the cache.

    cached_object(Url("s3", "bucket/data/held.jsonl"))   # $CKPTMERGE_CACHE/remote/<hash of URL and ETag>/held.jsonl
    cached_sidecars(Url("s3", "bucket/run/checkpoint-400"))  # a local folder with its config and tokenizer
    cached_tokenizer(Url("s3", "bucket/tokenizers/llama"))  # --tokenizer URL: a folder's tokenizer files, or one file

A data file is fetched whole, once per version (its ETag is part of the cache key, so a replaced object is
fetched again); a checkpoint's sidecars are fetched again on each use (a few small files). Weights are never
copied: they are read by byte ranges (``io/remote_safetensors.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ckptmerge.errors import TokenizerError
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_sidecars import MAX_SIDECAR_BYTES, mirror_sidecars
from ckptmerge.io.sidecars import TOKENIZER_FILES, TOKENIZER_MARKERS
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
    if local.suffix == ".bin":  # a token file's FILE.bin.json (its dtype) goes beside it when there is one
        _fetch_beside(Url(url.protocol, f"{url.path}.json"), local.with_name(f"{local.name}.json"))
    return local


def _fetch_beside(url: Url, local: Path) -> None:
    tree = RemoteTree.list(url)
    if tree.is_file(""):
        local.write_bytes(tree.read_bytes(""))


def cached_sidecars(url: Url) -> Path:
    """A local stand-in for checkpoint ``url``: its config and tokenizer files (and the run's), no weights."""
    return mirror_sidecars(url, cache_root() / _key(str(url)))


def cached_tokenizer(url: Url) -> Path:
    """A local copy of the tokenizer at ``url`` (``--tokenizer URL``): a ``tokenizer.json`` object as it is, or the
    tokenizer files of a folder (``save_pretrained``'s names) in a cache folder keyed by their versions."""
    tree = RemoteTree.list(url)
    if tree.is_file(""):
        return cached_object(url)
    found = {name: tree.object(name) for name in TOKENIZER_FILES
             if tree.is_file(name) and tree.object(name).size <= MAX_SIDECAR_BYTES}
    if not any(name in found for name in TOKENIZER_MARKERS):
        raise TokenizerError(f"--tokenizer {url}: no tokenizer files there (looked for {', '.join(TOKENIZER_MARKERS)}); "
                             "give the folder the tokenizer was saved to (save_pretrained) or its tokenizer.json")
    local = cache_root() / _key(str(url), *(f"{n}:{o.version}" for n, o in sorted(found.items()))) / (url.name or "tok")
    if not all((local / name).is_file() for name in found):
        partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        for name in found:
            (partial / name).write_bytes(tree.read_bytes(name))
        if local.exists():  # another process finished the same copy first
            shutil.rmtree(partial)
        else:
            os.replace(partial, local)
    return local
