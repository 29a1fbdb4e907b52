"""One search trial: an in-memory weighted sum of the window plus one held-out evaluation, no disk writes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckptmerge.checkpoint import CheckpointRef
from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.eval_runner import MAX_DEFAULT_CONTEXT
from ckptmerge.evaluate import EvalResult, evaluate_model, load_model, load_state_into
from ckptmerge.io.layout import open_checkpoint
from ckptmerge.memory_merge import merge_state_dicts


class MergeObjective:
    """Holds the window's tensors and scores coefficient vectors on held-out windows.

    Safetensors and torch-file checkpoints are kept as memory-mapped, file-backed views: windows that
    fit in RAM stay in the page cache, and larger ones stream from disk on every trial, with no
    anonymous copy. Checkpoints whose reader assembles tensors in memory (DCP) are copied once.
    """

    def __init__(self, refs: Sequence[CheckpointRef], *, n_tokens: int = 16384, batch_size: int = 16,
                 context: int | None = None):
        self.refs = list(refs)
        self._readers = [open_checkpoint(r.path) for r in self.refs]  # kept open: the views need their maps
        self.states = [self._tensors(reader) for reader in self._readers]
        self.model = load_model(self.refs[-1].path)
        self.context = context or min(self.model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT)
        self.n_tokens, self.batch_size = n_tokens, batch_size
        self._windows: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tensors(reader) -> dict[str, torch.Tensor]:
        file_backed = reader.layout in ("safetensors", "torch")
        return {k: reader.get(k) if file_backed else reader.get(k).clone() for k in reader.keys()}

    def windows(self, data: str) -> torch.Tensor:
        if data not in self._windows:
            self._windows[data] = eval_windows(load_tokens(data), n_tokens=self.n_tokens, context=self.context)
        return self._windows[data]

    def __call__(self, coeffs: Sequence[float], data: str, stop=None) -> EvalResult:
        merged = merge_state_dicts(self.states, coeffs, out_dtype=torch.float32,
                                   labels=[str(r.path) for r in self.refs])
        load_state_into(self.model, merged)
        return evaluate_model(self.model, self.windows(data), data=data, batch_size=self.batch_size, stop=stop)
