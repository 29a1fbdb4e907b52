"""Evaluate model folders on data sets: the same windows for every model, one model in memory at a time."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import EvalResult, load_model

MAX_DEFAULT_CONTEXT = 1024


def evaluate_paths(paths: list[Path], data: list[str], *, n_tokens: int = 32768, context: int | None = None,
                   batch_size: int = 16, bf16: bool = False,
                   device_map: str | None = None) -> dict[str, dict[str, EvalResult]]:
    """``{path: {data: EvalResult}}``. Windows depend only on (data, n_tokens, context)."""
    window_cache: dict[tuple[str, int], object] = {}
    results: dict[str, dict[str, EvalResult]] = {}
    for path in paths:
        model = load_model(path, device_map=device_map)
        ctx = context or min(model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT)
        results[str(path)] = {}
        for name in data:
            key = (name, ctx)
            if key not in window_cache:
                window_cache[key] = eval_windows(load_tokens(name), n_tokens=n_tokens, context=ctx)
            results[str(path)][name] = evaluate_sharded(model, window_cache[key], data=name, batch_size=batch_size,
                                                          bf16=bf16)
        del model
    return results
