"""A read-only, ``pathlib``-like view of one listing of a URL (``io/remote_tree.py``), so that the trainers' layouts
(``io/layouts/``) run their detection and step rules on a run in an object store unchanged.

    tree = RemoteTree.list(Url("s3", "bucket/run"))
    root = RemotePath(tree)
    [p.name for p in root.iterdir()]                     # ["global_step10", "latest", ...]
    (root / "iter_0000010" / "common.pt").is_file()      # answered from the listing: no request
    (root / "checkpoint-10" / "trainer_state.json").read_text()   # one GET, cached by ETag

Every question about names, folders, sizes and patterns (``/``, ``name``, ``suffix``, ``parent``, ``is_dir``,
``is_file``, ``exists``, ``iterdir``, ``glob``, ``stat().st_size``) is answered from the snapshot; only
``read_bytes`` / ``read_text`` send a request, one GET per small file, cached by the object's version. There is no
``__fspath__``: local file code given a ``RemotePath`` fails (``TypeError``) instead of opening a local file.
Why not ``universal_pathlib``: its ``UPath`` asks the store on each call (a HEAD or LIST per ``is_file``), where a
run's hundreds of questions should cost the one listing already taken.

Where a layout opens a reader, ``io/layouts/base.py`` hands a remote path to its methods (``open_plain``,
``open_dcp``, ``torch_payload`` ...); those are added by ``io/remote_layout.py``'s ``CheckpointPath``.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.remote import Url
from ckptmerge.io.remote_tree import RemoteTree

CACHE_BYTES = 64 * 1024 * 1024  # small files kept in memory across listings (keyed by URL and version)


class OutsideListing(CheckpointFormatError):
    """A layout asked about a file outside the URL that was listed (the folder above a checkpoint named alone)."""


@dataclass(frozen=True)
class RemoteStat:
    """What ``stat()`` answers from the listing: the size; a version-derived stand-in for the modification time."""

    st_size: int
    st_mtime_ns: int
    st_mode: int


class _Index:
    """The listing's folders and their entries, built once per tree (``RemoteTree.children`` scans every key)."""

    def __init__(self, tree: RemoteTree):
        self.children: dict[str, set[str]] = {}
        for key in tree.objects:
            parts = key.split("/") if key else []
            for depth in range(len(parts)):
                self.children.setdefault("/".join(parts[:depth]), set()).add(parts[depth])


class RemotePath:
    """``rel`` (``/``-separated, relative to the listed URL; ``""`` is the URL itself) in ``tree``."""

    is_remote = True  # io/layouts/base.py routes file access of such a path to its methods

    def __init__(self, tree: RemoteTree, rel: str = "", *, _index: _Index | None = None):
        self.tree, self.rel = tree, rel
        self._index = _index or _Index(tree)

    def _at(self, rel: str) -> RemotePath:
        return type(self)(self.tree, rel, _index=self._index)

    # --- names --------------------------------------------------------------------------------------------
    @property
    def url(self) -> Url:
        if self.rel.startswith(".."):
            raise OutsideListing(f"{self.tree.root}: ckptmerge listed only this URL, and reading it needs the files "
                                 f"beside it; give the folder that holds it instead")
        return self.tree.url(self.rel)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1] if self.rel else self.tree.root.name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        if not self.rel or self.rel.startswith(".."):
            return self._at(posixpath.normpath(posixpath.join(self.rel or ".", "..")))
        return self._at(self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")

    def __truediv__(self, other: str | os.PathLike) -> RemotePath:
        part = os.fspath(other) if not isinstance(other, str) else other
        if part.startswith("/") or "://" in part:
            raise ValueError(f"{self}: {part!r} is not a relative name")
        joined = posixpath.normpath(posixpath.join(self.rel, part)) if self.rel else posixpath.normpath(part)
        return self._at("" if joined == "." else joined)

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for part in parts:
            out = out / part
        return out

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self.rel[len(other.rel):].lstrip("/") or ".")

    def is_relative_to(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.tree.root == self.tree.root and (
            not other.rel or self.rel == other.rel or self.rel.startswith(other.rel + "/"))

    def resolve(self) -> RemotePath:
        return self  # an object store has no symlinks

    def __str__(self) -> str:
        return str(self.url) if not self.rel.startswith("..") else f"{self.tree.root}/{self.rel}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.tree.root, self.rel) == (other.tree.root, other.rel)

    def __hash__(self) -> int:
        return hash((self.tree.root, self.rel))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    # --- questions answered from the listing -------------------------------------------------------------
    def _inside(self) -> str:
        if self.rel.startswith(".."):
            raise OutsideListing(f"{self.tree.root}: ckptmerge listed only this URL, and reading it needs the files "
                                 f"beside it ({self.rel.removeprefix('../')}); give the folder that holds it instead")
        return self.rel

    def is_file(self) -> bool:
        return self.tree.is_file(self._inside())

    def is_dir(self) -> bool:
        rel = self._inside()
        return rel not in self.tree.objects and rel in self._index.children

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> RemoteStat:
        rel = self._inside()
        if rel in self.tree.objects:
            obj = self.tree.object(rel)
            return RemoteStat(obj.size, hash(obj.version) & (2 ** 62 - 1), 0o100444)
        if rel in self._index.children:
            return RemoteStat(0, 0, 0o040555)
        raise FileNotFoundError(f"{self}: not in the listing")

    def iterdir(self) -> list[RemotePath]:
        rel = self._inside()
        if not self.is_dir():
            raise NotADirectoryError(f"{self}: not a folder in the listing")
        return [self._at(f"{rel}/{name}" if rel else name) for name in sorted(self._index.children[rel])]

    def glob(self, pattern: str) -> list[RemotePath]:
        """``pathlib``'s ``glob`` for patterns of ``*``, ``?`` and ``[...]`` components (no ``**``), sorted."""
        if "**" in pattern or pattern.startswith("/"):
            raise ValueError(f"{self}: glob pattern {pattern!r} is not supported on a listing")
        found = [self] if self.is_dir() else []
        for component in pattern.split("/"):
            found = [child for folder in found if folder.is_dir() for child in folder.iterdir()
                     if fnmatch.fnmatchcase(child.name, component)]
        return sorted(found)

    # --- small reads: one GET each, cached ------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        rel = self._inside()
        if rel not in self.tree.objects:
            raise FileNotFoundError(f"{self}: not in the listing")
        return cached_read(self.tree, rel)

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")


_cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
_cache_lock = threading.Lock()
_reads = {"requests": 0}  # GETs of small files (tests count them)


def cached_read(tree: RemoteTree, rel: str) -> bytes:
    """The bytes of small object ``rel``: one GET the first time this version of it is asked for."""
    obj = tree.object(rel)
    key = (str(obj.url), obj.version)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        data = tree.read_bytes(rel)
    except ValueError as exc:  # larger than a metadata file can be
        raise CheckpointFormatError(f"{exc}; ckptmerge reads only small metadata files whole") from None
    with _cache_lock:
        _reads["requests"] += 1
        _cache[key] = data
        while sum(len(v) for v in _cache.values()) > CACHE_BYTES and len(_cache) > 1:
            _cache.popitem(last=False)
    return data


def subtree(tree: RemoteTree, rel: str) -> RemoteTree:
    """The listing of folder ``rel`` as a tree of its own (keys relative to it), taken from ``tree``: no request."""
    if not rel:
        return tree
    prefix = rel + "/"
    return RemoteTree(tree.url(rel), tree.fs, {key[len(prefix):]: obj for key, obj in tree.objects.items()
                                                if key.startswith(prefix)})
