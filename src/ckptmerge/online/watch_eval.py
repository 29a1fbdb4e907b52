"""One watch step's evaluation: the raw checkpoint and every method's merge on the same windows.

Metric names follow the field's trackers (OLMo-core's ``eval/merged/...``):

    eval/raw/<data>/loss                   eval/raw/<data>/bits_per_byte
    eval/merged/<method>/<data>/loss       eval/merged/<method>/<data>/bits_per_byte
    eval/merged/<method>/<data>/delta_vs_raw      (merged minus raw, nats/token, paired over the same windows)
    eval/merged/<method>/<data>/delta_vs_raw_se   (its standard error)

``<data>`` is the data set's name (a domain, or a file's name without its folder).
"""

from __future__ import annotations

import math
from pathlib import Path

from ckptmerge.evaluation.evaluator import EvalResult, paired_difference
from ckptmerge.evaluation.runner import evaluate_paths
from ckptmerge.evaluation.settings import EvalSettings


def evaluate_step(raw: Path, outputs: dict[str, Path], data: list[str], *, tokens: int,
                  settings: EvalSettings | None = None) -> dict[str, float]:
    """Metrics of one step (see the module docstring); every model scored on the same windows."""
    settings = settings or EvalSettings(progress=False)
    results = evaluate_paths([raw, *outputs.values()], data, n_tokens=tokens, settings=settings)
    return eval_metrics(results[str(raw)], {label: results[str(folder)] for label, folder in outputs.items()})


def eval_metrics(raw: dict[str, EvalResult], merged: dict[str, dict[str, EvalResult]]) -> dict[str, float]:
    """The metric names above for the raw weights' results and each label's results on the same windows
    (``{data: EvalResult}`` each); also what the callbacks' periodic evaluation logs (online/periodic_eval.py)."""
    metrics: dict[str, float] = {}
    for name, base in raw.items():
        key = data_key(name)
        metrics.update(_scores(f"eval/raw/{key}", base))
        for label, results in merged.items():
            metrics.update(_scores(f"eval/merged/{label}/{key}", results[name]))
            diff, se = paired_difference(results[name], base)
            metrics[f"eval/merged/{label}/{key}/delta_vs_raw"] = diff
            if math.isfinite(se):
                metrics[f"eval/merged/{label}/{key}/delta_vs_raw_se"] = se
    return metrics


def data_key(name: str) -> str:
    """``data/held.jsonl`` -> ``held.jsonl``; a domain name as it is."""
    return Path(name).name or name


def _scores(prefix: str, result: EvalResult) -> dict[str, float]:
    out = {f"{prefix}/loss": result.loss}
    if result.bits_per_byte is not None:
        out[f"{prefix}/bits_per_byte"] = result.bits_per_byte
    return out
