"""One listing of everything under a URL, taken once and asked many questions (``is_file``, ``children``, sizes).

    tree = RemoteTree.list(Url("s3", "bucket/run"))    # one recursive listing: a few paginated LIST calls
    tree.children("")            # ["checkpoint-100", "checkpoint-200", "config.json"]
    tree.object("checkpoint-100/model.safetensors")    # RemoteObject(url, size, version)
    tree.read_bytes("checkpoint-100/trainer_state.json")

Discovery, layout detection and the readers all work from this snapshot: no HEAD request per file.
Each object's ``version`` (ETag, GCS generation, else size and modification time) is what a merge pins:
listing again after the merge and finding another version means the object changed while it was read.

Inside ``shared_listings()`` (a merge: discovery, pinning, opening, sidecars) one listing serves every step:

    with shared_listings():
        run = RemoteTree.shared(Url("s3", "bucket/run"))                    # one LIST (paginated)
        ckpt = RemoteTree.shared(Url("s3", "bucket/run/checkpoint-100"))    # taken from it: no request
        ...                                                                 # the merge reads
        again = RemoteTree.relisted(Url("s3", "bucket/run/checkpoint-100"))  # fresh: one LIST for all inputs

Outside the scope ``shared`` and ``relisted`` are ``list``: a fresh listing each (``watch`` polls, ``inspect``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from ckptmerge.io.remote import (
    RemoteStorageError,
    Url,
    bucket_exists,
    filesystem,
    missing_bucket_message,
    remote_errors,
)

MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024
LIST_PAGE_OBJECTS = 1000  # S3's page: a listing of at most this many objects is one LIST request


@dataclass(frozen=True)
class RemoteObject:
    """One object: where it is, how many bytes, and which version of it was listed."""

    url: Url
    size: int
    version: str


class RemoteTree:
    """The objects under ``root`` (keys relative to it, ``/``-separated) as one listing found them."""

    def __init__(self, root: Url, fs, objects: dict[str, RemoteObject]):
        self.root, self.fs, self.objects = root, fs, objects

    @classmethod
    def list(cls, root: Url) -> RemoteTree:
        """List ``root`` recursively (a single object when ``root`` is one file). Inside ``shared_listings()`` a URL
        listed afresh on purpose (the hand-back's copy of the newest checkpoint) is never answered from an earlier
        listing: ``shared`` lists it again too."""
        scope = _scope
        if scope is not None:
            with scope.lock:
                scope.fresh.append(root)
        return cls._list(root)

    @classmethod
    def _list(cls, root: Url) -> RemoteTree:
        fs = filesystem(root)
        with remote_errors(root, "list"):
            fs.invalidate_cache(root.path)  # a fresh listing: versions are compared against earlier ones
            found = fs.find(root.path, detail=True)
        if not found and bucket_exists(root) is False:  # adlfs lists a missing container as empty
            raise RemoteStorageError(missing_bucket_message(root, "list"))
        objects = {}
        for key, info in found.items():
            if info.get("type", "file") != "file":
                continue
            key = key.split("://", 1)[-1].rstrip("/")
            rel = "" if key == root.path else key[len(root.path):].lstrip("/")
            if key != root.path and not key.startswith(root.path + "/"):
                continue
            objects[rel] = RemoteObject(Url(root.protocol, key), int(info.get("size") or 0), _version(info))
        return cls(root, fs, objects)

    @classmethod
    def shared(cls, url: Url) -> RemoteTree:
        """``url``'s objects from a listing already taken inside ``shared_listings()`` that covers it (no request),
        else ``list(url)`` (remembered there for the next question)."""
        scope = _scope
        if scope is not None and any(_inside(url, root) is not None for root in scope.fresh):
            return cls._list(url)
        found = covering_listing(url)
        if found is not None:
            return found
        tree = cls._list(url)
        if scope is not None:  # not listed yet, or absent from the earlier listing: asked, and remembered
            with scope.lock:
                scope.taken.append(tree)
        return tree

    @classmethod
    def relisted(cls, url: Url) -> RemoteTree:
        """A fresh listing of ``url``, to compare versions with after reading. Inside ``shared_listings()`` every
        URL registered by ``remember_pin`` is re-listed at the first call, side by side (or the one listing that
        covers them all, when that is a single LIST page), and later calls are answered from those listings."""
        scope = _scope
        if scope is None:
            return cls._list(url)
        with scope.lock:
            if not scope.relisted:
                scope.relisted = _relist(scope.taken, [*scope.pinned, url])
            found = _covering(scope.relisted, url)
        return found if found is not None else cls._list(url)

    def subtree(self, rel: str) -> RemoteTree:
        """Folder or object ``rel`` as a tree of its own (keys relative to it), taken from this listing."""
        if not rel:
            return self
        if rel in self.objects:
            return RemoteTree(self.url(rel), self.fs, {"": self.objects[rel]})
        prefix = rel + "/"
        return RemoteTree(self.url(rel), self.fs, {key[len(prefix):]: obj for key, obj in self.objects.items()
                                                   if key.startswith(prefix)})

    def exists(self) -> bool:
        return bool(self.objects)

    def is_file(self, rel: str) -> bool:
        return rel in self.objects

    def is_dir(self, rel: str) -> bool:
        prefix = f"{rel}/" if rel else ""
        return any(key.startswith(prefix) and key != rel for key in self.objects) and rel not in self.objects

    def object(self, rel: str) -> RemoteObject:
        return self.objects[rel]

    def url(self, rel: str) -> Url:
        return self.root / rel if rel else self.root

    def children(self, rel: str = "") -> list[str]:
        """Names of the files and folders directly inside folder ``rel``, sorted."""
        prefix = f"{rel}/" if rel else ""
        return sorted({key[len(prefix):].split("/", 1)[0] for key in self.objects
                       if key.startswith(prefix) and key != rel})

    def under(self, rel: str) -> dict[str, RemoteObject]:
        """Every object inside folder ``rel`` (or the object ``rel`` itself), by its key."""
        prefix = f"{rel}/" if rel else ""
        return {key: obj for key, obj in self.objects.items() if key == rel or key.startswith(prefix)}

    def read_bytes(self, rel: str) -> bytes:
        """A small file's bytes (metadata, an index, a tokenizer), in one request."""
        obj = self.objects[rel]
        if obj.size > MAX_SMALL_FILE_BYTES:
            raise ValueError(f"{obj.url}: {obj.size} bytes is too large to read as metadata")
        with remote_errors(obj.url, "read"):
            return self.fs.cat_file(obj.url.path)


@dataclass
class _Scope:
    taken: list[RemoteTree] = field(default_factory=list)  # listings to answer ``shared`` from
    pinned: list[Url] = field(default_factory=list)  # URLs a merge will re-list to verify (``remember_pin``)
    relisted: list[RemoteTree] = field(default_factory=list)  # their fresh listings, once verification began
    fresh: list[Url] = field(default_factory=list)  # URLs listed by ``list`` itself: never answered from a cache
    lock: threading.RLock = field(default_factory=threading.RLock)


_scope: _Scope | None = None  # one per process: a merge's listings are shared by the threads that open its inputs
_scope_lock = threading.Lock()


@contextmanager
def shared_listings() -> Iterator[None]:
    """Within: ``RemoteTree.shared`` answers from listings taken earlier inside (a scope opened inside another
    joins it); ``relisted`` lists the pinned inputs again once, side by side."""
    global _scope
    with _scope_lock:
        outer = _scope
        if outer is None:
            _scope = _Scope()
    try:
        yield
    finally:
        if outer is None:
            with _scope_lock:
                _scope = None


def covering_listing(url: Url) -> RemoteTree | None:
    """``url``'s part of a listing taken inside ``shared_listings()``, or None (outside it, or nothing covers it):
    no request either way."""
    scope = _scope
    if scope is None:
        return None
    with scope.lock:
        found = _covering(scope.taken, url)
    return found if found is not None and found.exists() else None


def remember_pin(url: Url) -> None:
    """Register ``url`` as an input whose versions ``relisted`` will check (no-op outside ``shared_listings``)."""
    scope = _scope
    if scope is not None:
        with scope.lock:
            scope.pinned.append(url)


def _covering(trees: list[RemoteTree], url: Url) -> RemoteTree | None:
    """``url``'s part of the newest listing in ``trees`` that covers it (its root is ``url`` or a folder above)."""
    for tree in reversed(trees):
        rel = _inside(url, tree.root)
        if rel is not None:
            return tree.subtree(rel)
    return None


def _inside(url: Url, root: Url) -> str | None:
    """``url``'s key relative to ``root`` (``""`` for ``root`` itself), or None when it is not inside it."""
    if root.protocol != url.protocol:
        return None
    if url.path == root.path:
        return ""
    prefix = root.path.rstrip("/") + "/"
    return url.path[len(prefix):] if url.path.startswith(prefix) else None


def _relist(taken: list[RemoteTree], urls: list[Url]) -> list[RemoteTree]:
    """Fresh listings covering ``urls``: the one earlier listing covering them all when it fits in one LIST page,
    else one listing per URL, sent side by side."""
    urls = list(dict.fromkeys(urls))
    for tree in taken:
        if len(tree.objects) <= LIST_PAGE_OBJECTS and all(_covering([tree], u) is not None for u in urls):
            return [RemoteTree._list(tree.root)]
    if len(urls) == 1:
        return [RemoteTree._list(urls[0])]
    with ThreadPoolExecutor(min(len(urls), 16), thread_name_prefix="ckptmerge-relist") as pool:
        return list(pool.map(RemoteTree._list, urls))


def _version(info: dict) -> str:
    """What identifies this version of an object: its generation on GCS (gcsfs lists an ``etag`` too, but GCS
    changes it on metadata updates, and an emulator makes it the MD5), else its ETag (S3, Azure), else size and
    time."""
    for key in ("generation", "ETag", "etag", "version_id", "VersionId"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}"
    when = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated") or ""
    return f"size:{info.get('size')}:time:{when}"
