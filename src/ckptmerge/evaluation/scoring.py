"""Score checkpoints and in-memory merges of them on held-out windows: one model, no disk writes.

    scorer = Scorer(n_tokens=16384)
    raw = scorer.score([ref], [1.0], "shakespeare-val")
    sma = scorer.score(window, [1 / len(window)] * len(window), "shakespeare-val")

Sweeps, the weight search and the reproduction experiments all evaluate through this class, so a
merge is always the engine's fp32 weighted sum and every model sees the same windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import EvalResult, load_model, load_state_into
from ckptmerge.evaluation.runner import MAX_DEFAULT_CONTEXT
from ckptmerge.io.layout import open_checkpoint
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.memory import merge_state_dicts


class Scorer:
    """Holds checkpoint tensors as views and scores coefficient vectors over any subset of them.

    Safetensors and torch-file checkpoints are kept as memory-mapped, file-backed views: what fits in
    RAM stays in the page cache, larger sets stream from disk on every score, with no anonymous copy.
    Checkpoints whose reader assembles tensors in memory (DCP) are copied once.
    """

    def __init__(self, *, n_tokens: int = 16384, batch_size: int = 16, context: int | None = None):
        self.n_tokens, self.batch_size, self._context = n_tokens, batch_size, context
        self._readers: dict[Path, object] = {}  # kept open: the views need their maps
        self._states: dict[Path, dict[str, torch.Tensor]] = {}
        self._windows: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None

    def state(self, ref: CheckpointRef) -> dict[str, torch.Tensor]:
        path = Path(ref.path)
        if path not in self._states:
            reader = open_checkpoint(path)
            file_backed = reader.layout in ("safetensors", "torch")
            self._readers[path] = reader
            self._states[path] = {k: reader.get(k) if file_backed else reader.get(k).clone() for k in reader.keys()}
        return self._states[path]

    @property
    def context(self) -> int:
        if self._context is None:
            raise RuntimeError("context is known once a model is loaded; score something first or pass context=")
        return self._context

    def windows(self, data: str) -> torch.Tensor:
        if data not in self._windows:
            self._windows[data] = eval_windows(load_tokens(data), n_tokens=self.n_tokens, context=self.context)
        return self._windows[data]

    def load(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float]) -> torch.nn.Module:
        """The model holding ``sum_i coeffs[i] * refs[i]`` (the first call builds it from ``refs[-1]``)."""
        if self.model is None:
            self.model = load_model(refs[-1].path)
            self._context = self._context or min(self.model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT)
        merged = merge_state_dicts([self.state(r) for r in refs], coeffs, out_dtype=torch.float32,
                                   labels=[str(r.path) for r in refs])
        load_state_into(self.model, merged)
        return self.model

    def score(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float], data: str, stop=None) -> EvalResult:
        model = self.load(refs, coeffs)
        return evaluate_sharded(model, self.windows(data), data=data, batch_size=self.batch_size, stop=stop)

    def forget(self, keep: Sequence[CheckpointRef] = ()) -> None:
        """Drop the views of every checkpoint not in ``keep`` (long sweeps over hundreds of checkpoints)."""
        wanted = {Path(r.path) for r in keep}
        for path in [p for p in self._states if p not in wanted]:
            del self._states[path]
            self._readers.pop(path).close()
