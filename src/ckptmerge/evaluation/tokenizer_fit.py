"""Is this the model's tokenizer? Its size against the model's embedding rows, and its EOS against the config's.

    check_tokenizer_fits(tokenizer, model, "runs/x/checkpoint-40")   # TokenizerError, a warning, or nothing

A model often has more embedding rows than its tokenizer has ids: trainers round the vocabulary up to a
multiple of 64 or 128 (nanoGPT: 50,304 rows for GPT-2's 50,257; Megatron: 128 x tensor-parallel size),
and some pad a little more (Qwen2.5: 151,936 rows for 151,665 ids). So:

| tokenizer ids vs rows | verdict |
|---|---|
| equal, or rows = ids (or the base vocabulary without added tokens) rounded up to a known multiple | fits |
| rows a little larger (at most ``SLACK_ROWS`` or ``SLACK_FRACTION``); added tokens past the rows | a warning |
| anything else (1,500 ids for a 67,500-row model) | refused, unless ``allow_mismatch`` |

A config EOS id inside the embedding that differs from the tokenizer's is a warning (documents are joined
with the tokenizer's EOS). Every message shows both sizes and where each came from.
"""

from __future__ import annotations

import warnings

import torch

from ckptmerge.data.text_tokenizer import TextTokenizer
from ckptmerge.errors import TokenizerError
from ckptmerge.evaluation.loading import model_vocab_size

PADDING_MULTIPLES = (64, 128, 256, 512, 1024)  # 64 / 128, and Megatron's 128 x TP for TP 2, 4, 8
SLACK_ROWS = 1024                              # extra rows past any known rounding that still look like padding
SLACK_FRACTION = 0.02


def check_tokenizer_fits(tokenizer: TextTokenizer, model: torch.nn.Module, model_path, *,
                         allow_mismatch: bool = False) -> None:
    """Refuse (``TokenizerError``) a tokenizer that is clearly not ``model``'s; warn where padding leaves doubt."""
    rows = model_vocab_size(model)
    if rows is None:
        return
    ids, base = tokenizer.vocab_size, _base_vocab(tokenizer)
    verdict = vocab_verdict(ids, base, rows)
    sizes = f"{_tokenizer_side(tokenizer, ids, base)}; {_model_side(model, model_path, rows)}"
    if verdict == "mismatch" and not allow_mismatch:
        raise TokenizerError(f"the tokenizer does not match the model: {sizes}; nothing was scored. Pass --tokenizer "
                             "with the tokenizer the model was trained with (or --allow-vocab-mismatch to score anyway)")
    if verdict == "mismatch":
        warnings.warn(f"the tokenizer does not match the model: {sizes}; scoring anyway (--allow-vocab-mismatch)",
                      stacklevel=2)
    elif verdict == "padded":
        warnings.warn(f"the tokenizer's size differs from the model's beyond the usual padding: {sizes}; scoring "
                      "anyway. Check that --tokenizer is the one the model was trained with", stacklevel=2)
    _check_eos(tokenizer, model, model_path, rows)


def vocab_verdict(ids: int, base: int, rows: int) -> str:
    """``fits``, ``padded`` (plausible padding or added tokens: warn) or ``mismatch`` (refuse)."""
    if rows == ids:
        return "fits"
    if rows > ids:
        if any(rows == _round_up(n, m) for n in {ids, base} for m in PADDING_MULTIPLES):
            return "fits"
        return "padded" if rows - ids <= max(SLACK_ROWS, SLACK_FRACTION * rows) else "mismatch"
    return "padded" if base <= rows else "mismatch"  # only added tokens lie past the rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _base_vocab(tokenizer: TextTokenizer) -> int:
    """Ids without the added tokens (``hf.vocab_size``); the full size when unknown."""
    base = getattr(tokenizer.hf, "vocab_size", None)
    return int(base) if isinstance(base, int) and 0 < base <= tokenizer.vocab_size else tokenizer.vocab_size


def _tokenizer_side(tokenizer: TextTokenizer, ids: int, base: int) -> str:
    added = f", {ids - base:,} of them added tokens" if ids != base else ""
    return f"tokenizer {tokenizer.name} has {ids:,} ids{added}"


def _model_side(model: torch.nn.Module, model_path, rows: int) -> str:
    config_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    config = f", config.json vocab_size {config_vocab:,}" if isinstance(config_vocab, int) else ""
    return f"model {model_path} has {rows:,} embedding rows{config}"


def _check_eos(tokenizer: TextTokenizer, model: torch.nn.Module, model_path, rows: int) -> None:
    config_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    eos_ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    eos_ids = [i for i in eos_ids if isinstance(i, int) and 0 <= i < rows]  # defaults past the rows mean nothing
    if tokenizer.eos_id is None or not eos_ids or tokenizer.eos_id in eos_ids:
        return
    warnings.warn(f"tokenizer {tokenizer.name} ends documents with id {tokenizer.eos_id}, but model {model_path}'s "
                  f"config.json says eos_token_id {config_eos}; check that --tokenizer is the model's", stacklevel=2)
