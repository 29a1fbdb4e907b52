"""A Scorer with a persistent cache: each (checkpoints, coefficients, windows) is scored once, ever."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckptmerge.evaluation.evaluator import EvalResult
from ckptmerge.evaluation.scoring import Scorer
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.io.fingerprint import checkpoint_files, fingerprint_files
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.sweep.cache import EvalCache, eval_key, windows_digest


class CachedScorer:
    """``score(refs, coeffs, data)`` through ``Scorer``, remembered in ``cache_file`` across runs."""

    def __init__(self, cache_file: str | Path, *, n_tokens: int = 16384, batch_size: int | None = None,
                 context: int | None = None, settings: EvalSettings | None = None):
        self.scorer = Scorer(n_tokens=n_tokens, batch_size=batch_size, context=context, settings=settings)
        self.cache = EvalCache(cache_file)
        self._fingerprints: dict[Path, str] = {}
        self._window_sha: dict[str, str] = {}
        self.hits = self.misses = 0

    def fingerprint(self, ref: CheckpointRef) -> str:
        path = Path(ref.path)
        if path not in self._fingerprints:
            self._fingerprints[path] = fingerprint_files(checkpoint_files(path))
        return self._fingerprints[path]

    def key(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float], data: str) -> str:
        """What determines the evaluation: the checkpoints' content, the non-zero weights and the windows."""
        if self.scorer.model is None:
            self.scorer.load(refs[-1:], [1.0])  # the model fixes the context, which fixes the windows
        if data not in self._window_sha:
            self._window_sha[data] = windows_digest(self.scorer.windows(data))
        refs, coeffs = _nonzero(refs, coeffs)
        return eval_key([self.fingerprint(r) for r in refs], coeffs, self._window_sha[data])

    def score(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float], data: str) -> EvalResult:
        key = self.key(refs, coeffs, data)
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        result = self.scorer.score(*_nonzero(refs, coeffs), data)
        self.remember(key, result, refs, coeffs)
        return result

    def remember(self, key: str, result: EvalResult, refs: Sequence[CheckpointRef], coeffs: Sequence[float]) -> None:
        refs, coeffs = _nonzero(refs, coeffs)
        self.cache.put(key, result, {"checkpoints": [str(r.path) for r in refs], "coeffs": coeffs})

    def raw(self, ref: CheckpointRef, data: str) -> EvalResult:
        return self.score([ref], [1.0], data)


def _nonzero(refs: Sequence[CheckpointRef], coeffs: Sequence[float]) -> tuple[list[CheckpointRef], list[float]]:
    """The checkpoints with a non-zero weight (a zero weight adds nothing), and their weights."""
    kept = [(r, c) for r, c in zip(refs, coeffs) if c != 0.0]
    return [r for r, _ in kept], [c for _, c in kept]
