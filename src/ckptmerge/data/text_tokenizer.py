"""The model's own tokenizer: found beside the checkpoint, loaded from local files only, fingerprinted.

    tok = resolve_tokenizer("runs/hf/checkpoint-400")          # the folder, else the run dir root
    tok = resolve_tokenizer("ckpt.pt", explicit="tok/")        # --tokenizer wins when given
    ids = tok.encode("some text")                              # numpy int64, no special tokens

Search order: ``--tokenizer`` (a folder or a ``tokenizer.json``), the checkpoint folder (HF Trainer
writes the tokenizer into every ``checkpoint-N/``), then the run directory holding it. Loading goes
through ``transformers.AutoTokenizer`` with ``local_files_only=True``: never the model hub. The
project's byte tokenizer is recognised and encoded with ``encode_bytes`` (exactly as before).
``fingerprint`` keys the token caches, so two tokenizers never share an entry.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckptmerge.data.tokenizer import VOCAB_SIZE, bytes_to_unicode, encode_bytes
from ckptmerge.errors import TokenizerError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass
class TextTokenizer:
    """What evaluation needs from a tokenizer: ids, EOS, vocabulary size, UTF-8 bytes per id, a fingerprint."""

    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int | None
    byte_lengths: np.ndarray = field(repr=False)  # (vocab_size,) UTF-8 bytes each id stands for; 0 for specials
    _encode: Callable[[str], list[int]] = field(repr=False)
    hf: object = field(repr=False, default=None)  # the transformers tokenizer, for tools that need one (lm-eval)

    @property
    def is_bytes(self) -> bool:
        return self.fingerprint == BYTE_FINGERPRINT

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of ``text`` without special tokens (raw bytes go straight through the byte tokenizer)."""
        if self.is_bytes:
            return encode_bytes(text if isinstance(text, bytes) else text.encode()).astype(np.int64)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._encode(text), dtype=np.int64)

    def separator(self) -> np.ndarray:
        """Tokens placed between documents: EOS, or a newline when the tokenizer has no EOS."""
        return np.asarray([self.eos_id], dtype=np.int64) if self.eos_id is not None else self.encode("\n")


BYTE_FINGERPRINT = "byte-v1"


def byte_tokenizer() -> TextTokenizer:
    """The project's byte tokenizer (id == UTF-8 byte)."""
    return TextTokenizer("byte", BYTE_FINGERPRINT, VOCAB_SIZE, None, np.ones(VOCAB_SIZE, dtype=np.int64),
                         lambda text: encode_bytes(text.encode()).tolist())


def has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_candidates(model_path: str | Path) -> list[Path]:
    """The checkpoint folder (a file's folder for raw checkpoints), then the run directory above it."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    return [folder, folder.parent] if folder.parent != folder else [folder]


def resolve_tokenizer(model_path: str | Path, explicit: str | Path | None = None) -> TextTokenizer:
    """The tokenizer of ``model_path``: ``explicit`` if given, else the first candidate folder holding one."""
    if explicit is not None:
        return load_tokenizer(explicit)
    candidates = tokenizer_candidates(model_path)
    for folder in candidates:
        if has_tokenizer_files(folder):
            return load_tokenizer(folder)
    looked = ", ".join(str(f) for f in candidates)
    raise TokenizerError(f"{model_path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {looked}; "
                         "nothing was scored. Pass --tokenizer PATH (the folder or tokenizer.json the model was "
                         "trained with), so the data is tokenized the way the model reads it")


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A tokenizer from a local folder or ``tokenizer.json`` (never the hub)."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"--tokenizer {path}: no such file or folder (tokenizers load from local files only)")
    if path.is_dir() and not has_tokenizer_files(path):
        raise TokenizerError(f"--tokenizer {path}: a folder without tokenizer files (looked for "
                             f"{', '.join(TOKENIZER_FILES)}); pass the folder the tokenizer was saved to "
                             "(save_pretrained) or its tokenizer.json")
    try:
        hf = _load_hf(path)
    except Exception as exc:  # transformers raises many kinds; the user needs the path and the cause
        raise TokenizerError(f"{path}: cannot load a tokenizer from local files ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); pass --tokenizer with a "
                             "folder written by save_pretrained or a tokenizer.json") from None
    if _is_byte_tokenizer(hf):
        byte = byte_tokenizer()
        byte.hf = hf
        return byte
    eos = hf.eos_token_id if hf.eos_token_id is not None else _guess_eos(hf)
    return TextTokenizer(str(path), _fingerprint(hf, eos), len(hf), eos, _byte_lengths(hf),
                         lambda text: hf.encode(text, add_special_tokens=False), hf)


def _load_hf(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _backend(hf) -> dict | None:
    backend = getattr(hf, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _is_byte_tokenizer(hf) -> bool:
    if len(hf) != VOCAB_SIZE:
        return False
    spec = _backend(hf)
    return (spec is not None and spec["model"].get("type") == "BPE" and not spec["model"].get("merges")
            and hf.get_vocab() == {c: b for b, c in bytes_to_unicode().items()})


def _guess_eos(hf) -> int | None:
    vocab = hf.get_vocab()
    return next((vocab[name] for name in EOS_NAMES if name in vocab), None)


def _fingerprint(hf, eos: int | None) -> str:
    spec = _backend(hf)
    body = json.dumps(spec, sort_keys=True) if spec is not None else json.dumps(sorted(hf.get_vocab().items()))
    return hashlib.sha256(f"{type(hf).__name__}\n{eos}\n{body}".encode()).hexdigest()[:20]


def _byte_lengths(hf) -> np.ndarray:
    """UTF-8 bytes of each id's text: byte-level pieces are one byte per char; SentencePiece '▁' is a space."""
    spec = _backend(hf) or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
    special = set(hf.all_special_ids)
    lengths = np.zeros(len(hf), dtype=np.int64)
    for i, piece in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
        if i in special or piece is None:
            continue
        if byte_level:
            lengths[i] = len(piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace("\u2581", " ").removeprefix("##").encode())
    return lengths
