"""Tokens of any ``--data`` source with a given tokenizer: tokenized once, cached, memory-mapped.

    tokens = load_tokens("heldout.jsonl", tok, text_field="text")   # np.memmap of ids
    tokens = load_tokens("shakespeare-val")                          # the byte tokenizer by default

Text is tokenized document by document without special tokens, and documents are joined with the
tokenizer's EOS token (a newline when it has none). The result is cached under
``<cache>/tokens/<tokenizer fingerprint>/`` keyed by the source's content hash, so a changed file or
another tokenizer never hits a stale entry. Token files (``.bin``, ``.npy``) are read in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ckptmerge.console import progress_bar
from ckptmerge.data.corpora import DOMAINS, cache_dir
from ckptmerge.data.sources import data_kind, iter_pieces, source_digest, source_size
from ckptmerge.data.text_tokenizer import TextTokenizer, byte_tokenizer, load_tokenizer
from ckptmerge.data.token_files import dtype_for_vocab, read_token_file, write_token_file
from ckptmerge.errors import DataError
from ckptmerge.io.remote import refuse_urls


def encode_source(spec: str, tokenizer: TextTokenizer, *, text_field: str = "text",
                  progress: bool = True) -> Iterator[np.ndarray]:
    """Token chunks of the text in ``spec``: documents joined by the tokenizer's separator."""
    bar = progress_bar(source_size(spec), f"tokenize {Path(spec).name}", enabled=progress)
    separator, first, count = tokenizer.separator(), True, 0
    for piece in iter_pieces(spec, text_field):
        if piece.starts_document and not first:
            yield separator
        first = False
        ids = tokenizer.encode(piece.text)
        count += len(ids)
        yield ids
        bar.update(piece.source_bytes)
    bar.close()
    if count == 0:  # raised inside the writer: no empty cache file is left behind to be blamed later
        raise DataError(f"{spec}: {_no_text(spec, text_field)}; nothing to score or tokenize. Pass data that holds text")


def _no_text(spec: str, text_field: str) -> str:
    kind = data_kind(spec)
    if kind == "jsonl":
        return f"no line has text in field {text_field!r} (the file is empty, or every value is empty)"
    if kind in ("parquet", "datasets"):
        return f"no row has text in column {text_field!r} (no rows, or every value is empty or null)"
    return "the file is empty (or holds only text that encodes to no tokens)"


def token_file(spec: str, tokenizer: TextTokenizer | None = None, *, text_field: str = "text",
               progress: bool = True) -> Path:
    """The cached token file of text source ``spec`` under ``tokenizer`` (written on first use)."""
    tokenizer = tokenizer or byte_tokenizer()
    stem = spec if spec in DOMAINS else Path(spec).name.split(".")[0]
    out = cache_dir() / "tokens" / tokenizer.fingerprint / f"{stem}-{source_digest(spec, text_field)}.bin"
    if not out.is_file():
        write_token_file(out, encode_source(spec, tokenizer, text_field=text_field, progress=progress),
                         dtype=dtype_for_vocab(tokenizer.vocab_size),
                         about={"source": str(spec), "tokenizer": tokenizer.fingerprint, "text_field": text_field})
    return out


def load_tokens(spec: str, tokenizer: TextTokenizer | None = None, *, text_field: str = "text",
                token_dtype: str | None = None, model_vocab: int | None = None, progress: bool = True) -> np.ndarray:
    """Read-only memmap of the tokens of ``spec``: a token file as it is, text through ``tokenizer``.

    ``model_vocab``: the embedding rows of the model that reads a token file (``read_token_file``)."""
    if data_kind(spec) == "tokens":
        return read_token_file(spec, token_dtype, model_vocab=model_vocab)
    return read_token_file(token_file(spec, tokenizer, text_field=text_field, progress=progress))


def is_token_file(spec: str) -> bool:
    return data_kind(spec) == "tokens"


def tokenize_file(spec: str, tokenizer_path: str | Path, output: str | Path, *, text_field: str = "text",
                  progress: bool = True) -> tuple[int, str]:
    """Write ``spec``'s tokens to ``output`` as a nanoGPT ``.bin`` (+ sidecar); returns (tokens, dtype)."""
    refuse_urls("data tokenize", "copy the file and the tokenizer to local paths first (eval, search and sweep take "
                "--data and --tokenizer URLs)", source=spec, tokenizer=tokenizer_path, output=output)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    count = write_token_file(output, encode_source(spec, tokenizer, text_field=text_field, progress=progress),
                             dtype=dtype, about={"source": str(spec), "tokenizer": tokenizer.fingerprint,
                                                 "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id})
    return count, dtype


def prepare(domains: list[str] | None = None) -> dict[str, int]:
    """Build the byte-token files of ``domains`` (default: all built-ins); returns token counts."""
    return {name: int(load_tokens(name).shape[0]) for name in (domains or list(DOMAINS))}
