"""What ``--data`` names, and the documents in it: local files and folders only, never the hub.

| ``--data`` | read as |
|---|---|
| a built-in domain (``shakespeare-val``, ...) | one document |
| ``*.txt`` (any other text file) | one document, read in 1 MiB pieces split after a newline |
| ``*.jsonl``, ``*.jsonl.gz`` | one document per line, the ``--text-field`` string (default ``text``) |
| ``*.parquet`` | one document per row of the ``--text-field`` column (needs ``pyarrow``) |
| a folder written by ``datasets.save_to_disk`` | one document per row of ``--text-field`` (needs ``datasets``) |
| ``*.bin`` (nanoGPT), ``*.npy`` | token ids, no tokenizer needed (``ckptmerge.data.token_files``) |
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.data.corpora import DOMAINS, domain_text
from ckptmerge.errors import DataError, import_optional

TOKEN_SUFFIXES = (".bin", ".npy")
PIECE_BYTES = 1 << 20
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Piece:
    """Text read from a source: ``starts_document`` is False for the continuation of a long text file."""

    text: str | bytes
    starts_document: bool
    source_bytes: int  # bytes of the input consumed, for progress bars


def data_kind(spec: str) -> str:
    """``domain``, ``tokens``, ``jsonl``, ``parquet``, ``datasets`` or ``text``; a missing path is an error."""
    if spec in DOMAINS:
        return "domain"
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder, and not a built-in domain ({', '.join(DOMAINS)}); "
                        "data is read from local paths only")
    if path.is_dir():
        if any((path / m).is_file() for m in DATASETS_MARKERS):
            return "datasets"
        raise DataError(f"--data {spec}: a folder, but not one written by datasets' save_to_disk "
                        f"(no {' / '.join(DATASETS_MARKERS)}); pass a file or a saved dataset")
    name = path.name.lower()
    if name.endswith(TOKEN_SUFFIXES):
        return "tokens"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def source_digest(spec: str, text_field: str) -> str:
    """A content hash of the source (and the field read from it): the token cache key."""
    h = hashlib.sha256(f"{data_kind(spec)}\n{text_field}\n".encode())
    if spec in DOMAINS:
        h.update(f"domain:{spec}".encode())
        return h.hexdigest()[:20]
    path = Path(spec)
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(PIECE_BYTES), b""):
                h.update(block)
    return h.hexdigest()[:20]


def source_size(spec: str) -> int | None:
    """Bytes of input, for the progress bar (None for domains and folders)."""
    path = Path(spec)
    return path.stat().st_size if spec not in DOMAINS and path.is_file() else None


def iter_pieces(spec: str, text_field: str = "text") -> Iterator[Piece]:
    """The text of ``spec`` in pieces; each document starts with a piece whose ``starts_document`` is True."""
    kind = data_kind(spec)
    if kind == "domain":
        text = domain_text(spec)
        yield Piece(text, True, len(text))
    elif kind == "text":
        yield from _text_pieces(Path(spec))
    elif kind == "jsonl":
        yield from _jsonl_pieces(Path(spec), text_field)
    elif kind == "parquet":
        yield from _parquet_pieces(Path(spec), text_field)
    elif kind == "datasets":
        yield from _datasets_pieces(Path(spec), text_field)
    else:
        raise DataError(f"--data {spec}: a token file holds no text; it is read by ckptmerge.data.token_files")


def _text_pieces(path: Path) -> Iterator[Piece]:
    first, rest = True, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(PIECE_BYTES), b""):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            yield Piece(piece, first, len(piece))
            first = False
    if rest or first:
        yield Piece(rest, first, len(rest))


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no field {text_field!r} (has: {keys}); pass --text-field NAME")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            yield Piece(_field(record, text_field, f"{path}:{number}"), True, len(line))


def _parquet_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    pq = import_optional("pyarrow.parquet", extra="data", needed_by=f"{path}: reading Parquet")
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (has: {', '.join(table.schema_arrow.names)}); "
                        "pass --text-field NAME")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Piece(text, True, len(text.encode()))


def _datasets_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    datasets = import_optional("datasets", extra="data", needed_by=f"{path}: reading a saved dataset")
    Dataset, load_from_disk = datasets.Dataset, datasets.load_from_disk
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, Dataset):
        raise DataError(f"{path}: a dataset with splits {', '.join(dataset)}; pass one split's folder, "
                        f"e.g. --data {path / next(iter(dataset))}")
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no column {text_field!r} (has: {', '.join(dataset.column_names)}); "
                        "pass --text-field NAME")
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if text is not None:
                yield Piece(text, True, len(text.encode()))
