"""Evaluate models on data sets: the same windows for every model, one model in memory at a time.

    results = evaluate_paths(["out/sma", "runs/hf/checkpoint-400"], ["heldout.jsonl"],
                             settings=EvalSettings(device="cuda", dtype="bfloat16"))
    results["out/sma"]["heldout.jsonl"].bits_per_byte

Each model's data is tokenized with that model's own tokenizer (``EvalSettings.tokenizer_for``);
models sharing a tokenizer share windows, and ``bits_per_byte`` compares models that do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptmerge.console import progress_bar
from ckptmerge.data.batches import planned_tokens
from ckptmerge.data.text_tokenizer import TextTokenizer
from ckptmerge.errors import TokenizerError
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import EvalResult
from ckptmerge.evaluation.loading import model_vocab_size
from ckptmerge.evaluation.remote_model import local_data
from ckptmerge.evaluation.settings import EvalSettings, byte_lengths, require_tokenizer

MAX_DEFAULT_CONTEXT = 1024


def default_context(model: torch.nn.Module) -> int:
    """The model's max positions (at most 1024); 1024 when the model does not say."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    block = getattr(config, "block_size", None) or getattr(model, "block_size", None)
    return min(positions or block or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)


def evaluate_paths(paths: list[Path], data: list[str], *, n_tokens: int = 32768, context: int | None = None,
                   batch_size: int | None = None, bf16: bool = False,
                   settings: EvalSettings | None = None) -> dict[str, dict[str, EvalResult]]:
    """``{path: {data: EvalResult}}``. Windows depend only on (data, tokenizer, n_tokens, context)."""
    settings = settings or EvalSettings()
    batch_size = batch_size or settings.batch_size
    window_cache: dict[tuple, torch.Tensor] = {}
    results: dict[str, dict[str, EvalResult]] = {}
    bar = progress_bar(len(paths) * len(data), "eval", unit="eval", enabled=settings.progress and len(paths) > 1)
    for path in paths:
        tokenizer = settings.tokenizer_for(path)
        require_tokenizer(tokenizer, data)  # before the model is loaded: nothing is scored without one
        model = settings.load_model(path)
        settings.check_tokenizer(tokenizer, model, path)  # the model's own tokenizer, or nothing is scored
        ctx = context or default_context(model)
        results[str(path)] = {}
        for name in data:
            windows = _windows(window_cache, settings, name, tokenizer, model, n_tokens, ctx)
            results[str(path)][name] = evaluate_sharded(  # one process: exactly evaluate_model
                model, windows, data=name, batch_size=batch_size, bf16=bf16, max_batch_tokens=settings.max_batch_tokens,
                byte_lengths=byte_lengths(tokenizer), tokens_requested=planned_tokens(n_tokens, ctx))
            bar.update(1)
        del model
    bar.close()
    return results


def _windows(cache: dict, settings: EvalSettings, data: str, tokenizer: TextTokenizer | TokenizerError,
             model: torch.nn.Module, n_tokens: int, context: int) -> torch.Tensor:
    key = (data, getattr(tokenizer, "fingerprint", None), model_vocab_size(model), n_tokens, context)
    if key not in cache:  # the vocabulary decides how a token file without sidecar may be read
        cache[key] = settings.windows(local_data(data), tokenizer, model, n_tokens=n_tokens, context=context)
    return cache[key]
