"""What every experiment shares: the scale, the run folder, one cached scorer, the evaluation data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.evaluation.evaluator import EvalResult, paired_difference
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import discover
from ckptmerge.reproduce.runs import Scale
from ckptmerge.sweep.evaluator import CachedScorer

IN_DOMAIN = "shakespeare-val"
TOL_NATS = 0.02  # "about equal" in every claim: fixed before any run, about 1% of the loss at these scales


@dataclass
class Context:
    work: Path
    scale: Scale
    scorer: CachedScorer
    progress: bool = True
    log: Callable = print

    @classmethod
    def create(cls, work: Path, scale: Scale, progress: bool = True, log: Callable = print) -> "Context":
        return cls(work, scale, CachedScorer(work / "evals.jsonl", n_tokens=scale.eval_tokens), progress, log)

    def score(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float], data: str = IN_DOMAIN) -> EvalResult:
        return self.scorer.score(refs, coeffs, data)

    def raw(self, path: Path | CheckpointRef, data: str = IN_DOMAIN) -> EvalResult:
        ref = path if isinstance(path, CheckpointRef) else CheckpointRef(Path(path))
        return self.scorer.raw(ref, data)

    def sma(self, refs: Sequence[CheckpointRef], data: str = IN_DOMAIN) -> EvalResult:
        return self.score(refs, [1.0 / len(refs)] * len(refs), data)

    @staticmethod
    def diff(a: EvalResult, b: EvalResult) -> tuple[float, float]:
        """``a - b`` window by window: (mean, standard error)."""
        return paired_difference(a, b)

    def checkpoints(self, run_dir: Path) -> list[CheckpointRef]:
        self.scorer.scorer.forget()  # views of earlier runs are not needed again
        return discover(run_dir).checkpoints
