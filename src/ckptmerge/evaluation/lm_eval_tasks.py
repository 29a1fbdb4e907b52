"""Downstream tasks through lm-evaluation-harness, on a model held in memory (``pip install 'ckptmerge[lm-eval]'``).

    scores = run_lm_eval(Path("merged/sma"), ["arc_easy"], settings=EvalSettings(device="cuda"))
    scorer = LmEvalScorer(["my_task"], include=["tasks/"])      # reused across search trials
    acc = scorer.score(model, tokenizer)["my_task"]["acc"]

lm-eval's own HF wrapper (``HFLM``) is given the resident ``transformers`` model and the model's
tokenizer, so no folder is written per trial and the model stays on its device. Tasks are resolved
once (``TaskManager`` indexes every task YAML, which takes seconds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.data.text_tokenizer import TextTokenizer
from ckptmerge.errors import CkptMergeError, ConfigError
from ckptmerge.evaluation.settings import EvalSettings


def _import_lm_eval():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data must be local: never fetch it
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'ckptmerge[lm-eval]'") from None
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval, HFLM, TaskManager


class LmEvalScorer:
    """lm-eval ``tasks`` resolved once, scored on any model and tokenizer."""

    def __init__(self, tasks: Sequence[str], *, include: Sequence[str] = (), limit: int | None = None,
                 batch_size: int = 8):
        self.lm_eval, self._hflm, task_manager = _import_lm_eval()
        for folder in include:
            if not Path(folder).is_dir():
                raise ConfigError(f"--lm-eval-include {folder}: no such folder")
        self.tasks, self.limit, self.batch_size = list(tasks), limit, batch_size
        self.task_manager = task_manager(include_path=[str(Path(f).resolve()) for f in include] or None)
        unknown = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            raise ConfigError(f"lm-eval task(s) {', '.join(unknown)} not found; add their YAML folder with "
                              "--lm-eval-include DIR")

    def score(self, model: torch.nn.Module, tokenizer: TextTokenizer) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` (lm-eval's ``acc,none`` becomes ``acc``)."""
        if getattr(tokenizer, "hf", None) is None:
            raise CkptMergeError("lm-eval needs the model's transformers tokenizer; pass --tokenizer DIR")
        if not hasattr(model, "config"):
            raise CkptMergeError("lm-eval runs transformers models only; --model-factory modules are not supported")
        lm = self._hflm(pretrained=model, tokenizer=tokenizer.hf, batch_size=self.batch_size,
                        device=str(next(model.parameters()).device))
        out = self.lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.task_manager,
                                           limit=self.limit, log_samples=False, verbosity="ERROR")
        return {task: {key.split(",")[0]: float(value) for key, value in metrics.items()
                       if isinstance(value, (int, float)) and not key.startswith("alias")}
                for task, metrics in out["results"].items()}


def run_lm_eval(path: Path, tasks: Sequence[str], *, settings: EvalSettings, include: Sequence[str] = (),
                limit: int | None = None) -> dict[str, dict[str, float]]:
    """Score the model at ``path`` on lm-eval ``tasks`` (``ckptmerge eval --lm-eval``)."""
    scorer = LmEvalScorer(tasks, include=include, limit=limit, batch_size=settings.batch_size)
    tokenizer = settings.tokenizer_for(path)
    if not isinstance(tokenizer, TextTokenizer):
        raise tokenizer
    model = settings.load_model(path)
    settings.check_tokenizer(tokenizer, model, path)  # the model's own tokenizer, or nothing is scored
    return scorer.score(model, tokenizer)


def parse_objective(objective: str) -> tuple[str, str]:
    """``lm-eval:TASK:METRIC`` -> ``(TASK, METRIC)``."""
    parts = objective.split(":")
    if len(parts) != 3 or parts[0] != "lm-eval" or not parts[1] or not parts[2]:
        raise ConfigError(f"--objective {objective!r}: expected loss, bits_per_byte or lm-eval:TASK:METRIC")
    return parts[1], parts[2]
