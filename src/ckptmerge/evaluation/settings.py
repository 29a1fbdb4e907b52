"""How models are built and data is read for evaluation: one object shared by eval, search, sweep and the API."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.text_tokenizer import TextTokenizer, resolve_tokenizer
from ckptmerge.data.token_files import check_ids_below
from ckptmerge.data.tokens import is_token_file, load_tokens
from ckptmerge.errors import TokenizerError
from ckptmerge.evaluation.loading import load_model, model_vocab_size
from ckptmerge.evaluation.remote_model import load_remote_model, local_data, local_tokenizer, tokenizer_home
from ckptmerge.evaluation.tokenizer_fit import check_tokenizer_fits
from ckptmerge.io.remote import is_url


@dataclass
class EvalSettings:
    """Every evaluation option a user can set (CLI flags of the same names)."""

    device: str = "auto"               # auto, cpu, cuda, cuda:N, mps
    dtype: str = "float32"             # what the model computes in; merges are still accumulated in fp32
    tokenizer: str | None = None       # a folder or tokenizer.json; default: beside the checkpoint
    text_field: str = "text"           # JSONL / Parquet / datasets column holding the text
    token_dtype: str | None = None     # .bin token files: uint16 or uint32 (default: the sidecar; uint16 only
                                       # when the model's vocabulary fits it)
    allow_vocab_mismatch: bool = False  # score with a tokenizer whose size does not fit the model (a warning)
    model_config: str | None = None    # HF config folder for raw .pt / DCP checkpoints
    model_factory: str | None = None   # package.module:function returning an nn.Module
    key_map: list[str] = field(default_factory=list)  # OLD=NEW regex renames of checkpoint keys
    batch_size: int = 16               # rows per batch
    max_batch_tokens: int | None = None  # tokens per batch (rows = this // context), when given
    device_map: str | None = None     # "auto": spread a model too large for one device (accelerate)
    progress: bool = True

    def load_model(self, path) -> torch.nn.Module:
        if is_url(path):  # s3://, gs://: config mirrored, weights by range reads (evaluation/remote_model.py)
            return load_remote_model(path, device=self.device, dtype=self.dtype, model_config=self.model_config,
                                     model_factory=self.model_factory, key_map=self.key_map)
        return load_model(path, device=self.device, dtype=self.dtype, model_config=self.model_config,
                          model_factory=self.model_factory, key_map=self.key_map, device_map=self.device_map)

    def tokenizer_for(self, model_path) -> TextTokenizer | TokenizerError:
        """The model's tokenizer, or (when none is found and none was given) the error to raise for text data."""
        try:
            return resolve_tokenizer(tokenizer_home(model_path), local_tokenizer(self.tokenizer))
        except TokenizerError as exc:
            if self.tokenizer is not None:
                raise
            return exc

    def tokens(self, data: str, tokenizer: TextTokenizer | TokenizerError, model_vocab: int | None = None) -> np.ndarray:
        """Token ids of ``data``: token files as they are (``model_vocab``: the reading model's embedding rows),
        text through the model's tokenizer."""
        data = local_data(data)  # s3://, gs://: the cached copy of the object (fetched once per version)
        if is_token_file(data):
            return load_tokens(data, token_dtype=self.token_dtype, model_vocab=model_vocab)
        require_tokenizer(tokenizer, [data])
        return load_tokens(data, tokenizer, text_field=self.text_field, progress=self.progress)

    def windows(self, data: str, tokenizer: TextTokenizer | TokenizerError, model: torch.nn.Module | None, *,
                n_tokens: int, context: int) -> torch.Tensor:
        """The eval windows of ``data`` for ``model``; a token file's ids must be ids ``tokenizer`` can produce."""
        data = local_data(data)  # s3://, gs://: the cached copy of the object (fetched once per version)
        vocab = model_vocab_size(model) if model is not None else None
        windows = eval_windows(self.tokens(data, tokenizer, vocab), n_tokens=n_tokens, context=context)
        if is_token_file(data) and isinstance(tokenizer, TextTokenizer):
            check_ids_below(windows, tokenizer.vocab_size, data=data,
                            what=f"the vocabulary of tokenizer {tokenizer.name} ({tokenizer.vocab_size:,} ids)")
        return windows

    def check_tokenizer(self, tokenizer: TextTokenizer | TokenizerError, model: torch.nn.Module, path) -> None:
        """Refuse a tokenizer that is not ``model``'s (``evaluation/tokenizer_fit.py``) before anything is scored."""
        if isinstance(tokenizer, TextTokenizer):
            check_tokenizer_fits(tokenizer, model, path, allow_mismatch=self.allow_vocab_mismatch)


def require_tokenizer(tokenizer: TextTokenizer | TokenizerError, data: list[str]) -> None:
    """Raise the lookup's error when a tokenizer is missing and some of ``data`` is text."""
    if isinstance(tokenizer, TokenizerError) and not all(is_token_file(local_data(d)) for d in data):
        raise tokenizer


def byte_lengths(tokenizer: TextTokenizer | TokenizerError) -> np.ndarray | None:
    return tokenizer.byte_lengths if isinstance(tokenizer, TextTokenizer) else None
