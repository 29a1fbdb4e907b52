"""One search trial: an in-memory weighted sum of the window plus one held-out evaluation, no disk writes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.evaluator import EvalResult
from ckptmerge.evaluation.scoring import Scorer
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.merging.checkpoint import CheckpointRef


class MergeObjective:
    """Scores coefficient vectors over a fixed window of checkpoints (see ``ckptmerge.evaluation.scoring.Scorer``)."""

    def __init__(self, refs: Sequence[CheckpointRef], *, n_tokens: int = 16384, batch_size: int | None = None,
                 context: int | None = None, scorer: Scorer | None = None, settings: EvalSettings | None = None):
        self.refs = list(refs)
        self.scorer = scorer or Scorer(n_tokens=n_tokens, batch_size=batch_size, context=context, settings=settings)
        for ref in self.refs:
            self.scorer.state(ref)  # open every checkpoint now, so a bad window fails before any trial
        self.scorer.load(self.refs, [0.0] * (len(self.refs) - 1) + [1.0])

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def model(self) -> torch.nn.Module:
        return self.scorer.model

    def windows(self, data: str) -> torch.Tensor:
        return self.scorer.windows(data)

    def __call__(self, coeffs: Sequence[float], data: str, stop=None) -> EvalResult:
        return self.scorer.score(self.refs, coeffs, data, stop=stop)

    def task_score(self, coeffs: Sequence[float], objective: str, *, include: Sequence[str] = (),
                   limit: int | None = None) -> float:
        """lm-eval's ``METRIC`` on ``TASK`` (``objective`` = ``lm-eval:TASK:METRIC``) for the merged weights."""
        from ckptmerge.evaluation.lm_eval_tasks import LmEvalScorer, parse_objective

        task, metric = parse_objective(objective)
        if self._lm_eval is None:
            self._lm_eval = LmEvalScorer([task], include=include, limit=limit, batch_size=self.batch_size)
        scores = self._lm_eval.score(self.scorer.load(self.refs, coeffs), self.scorer.tokenizer)[task]
        if metric not in scores:
            raise ConfigError(f"--objective {objective}: task {task} reports {', '.join(sorted(scores))}, not {metric}")
        return scores[metric]

    _lm_eval = None
