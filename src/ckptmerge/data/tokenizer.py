"""The byte-level tokenizer: token id == UTF-8 byte, so losses are nats per byte on every domain.

``save_hf_tokenizer`` writes it as an HF fast tokenizer, so checkpoint folders load with
``AutoTokenizer.from_pretrained`` and ``tokenizer.encode(text) == list(text.encode())``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
TOKEN_DTYPE = np.uint16  # nanoGPT's .bin convention


def encode_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map, used by HF byte-level tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_hf_tokenizer(folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json for the byte tokenizer into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20).save_pretrained(folder)
