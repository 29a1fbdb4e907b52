"""``cm.evaluate``: held-out loss of models from Python, with the same options as ``ckptmerge eval``."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.evaluation.evaluator import EvalResult
from ckptmerge.evaluation.runner import evaluate_paths
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.io.remote import as_location


def evaluate(models: list[str | Path], data: list[str], *, n_tokens: int = 32768, context: int | None = None,
             **options) -> dict[str, dict[str, EvalResult]]:
    """``{model: {data: EvalResult}}`` (nats/token, bits/byte, tokens, bytes, standard errors).

    ``options`` are ``EvalSettings`` fields: ``device``, ``dtype``, ``tokenizer``, ``text_field``,
    ``token_dtype``, ``allow_vocab_mismatch``, ``model_config``, ``model_factory``, ``key_map``, ``batch_size``,
    ``max_batch_tokens``.

    Example::

        import ckptmerge as cm
        r = cm.evaluate(["runs/hf/checkpoint-400"], ["heldout.jsonl"], device="cuda", dtype="bfloat16")
        r["runs/hf/checkpoint-400"]["heldout.jsonl"].bits_per_byte
        cm.evaluate(["s3://bucket/run/checkpoint-400"], ["s3://bucket/held.jsonl"])   # docs/storage.md
    """
    settings = EvalSettings(**{"progress": False, **options})
    return evaluate_paths([as_location(m) for m in models], list(data), n_tokens=n_tokens, context=context,
                          settings=settings)  # a URL stays a Url: its weights are read by range requests
