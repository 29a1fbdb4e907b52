"""Score checkpoints and in-memory merges of them on held-out windows: one resident model, no disk writes.

    scorer = Scorer(n_tokens=16384, settings=EvalSettings(device="cuda", dtype="bfloat16"))
    raw = scorer.score([ref], [1.0], "heldout.jsonl")
    sma = scorer.score(window, [1 / len(window)] * len(window), "heldout.jsonl")

    scorer = Scorer.resident(build_model("tiny", 0), context=64, n_tokens=4096)   # weights held in memory
    merged = merge_vectors([flat_a, flat_b], [0.5, 0.5])                           # fp64 sum, fp32 result
    scorer.score_vector(merged, "shakespeare-val").window_losses

Sweeps, the weight search and the reproduction experiments all evaluate through this class, so a
merge is always the engine's fp32 weighted sum and every model sees the same windows, tokenized
with the model's own tokenizer (a resident model built in memory has no folder to find one in: its
data are read with the byte tokenizer). On a GPU the checkpoints' tensors are moved to the device
once, so each trial's weighted sum is built there and copied into the resident model, never back to
the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.data.batches import planned_tokens
from ckptmerge.data.text_tokenizer import TextTokenizer
from ckptmerge.evaluation.devices import resolve_device
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import EvalResult, load_state_into
from ckptmerge.evaluation.keymap import fit_state, parse_key_map
from ckptmerge.evaluation.runner import default_context
from ckptmerge.errors import TokenizerError
from ckptmerge.evaluation.settings import EvalSettings, byte_lengths
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.memory import merge_state_dicts


def merge_vectors(vectors: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """``sum_i coeffs[i] * vectors[i]`` of flat weight vectors, accumulated in fp64 and returned in fp32."""
    if len(vectors) != len(coeffs) or not vectors:
        raise ValueError(f"merge_vectors: {len(vectors)} vectors and {len(coeffs)} coefficients; give one per vector")
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for vector, c in zip(vectors, coeffs):
        out.add_(vector.double(), alpha=float(c))
    return out.float()


class Scorer:
    """Holds checkpoint tensors and scores coefficient vectors over any subset of them.

    On the CPU, safetensors and torch-file checkpoints are kept as memory-mapped, file-backed views:
    what fits in RAM stays in the page cache, larger sets stream from disk on every score. Checkpoints
    whose reader assembles tensors in memory (DCP) are copied once. On an accelerator every tensor is
    copied to the device once.
    """

    def __init__(self, *, n_tokens: int = 16384, batch_size: int | None = None, context: int | None = None,
                 settings: EvalSettings | None = None):
        self.settings = settings or EvalSettings()
        self.n_tokens, self._context = n_tokens, context
        self.batch_size = batch_size or self.settings.batch_size
        self.device = resolve_device(self.settings.device)
        self._readers: dict[Path, object] = {}  # kept open: the views need their maps
        self._states: dict[Path, dict[str, torch.Tensor]] = {}
        self._windows: dict[str, torch.Tensor] = {}
        self.tokenizer: TextTokenizer | TokenizerError | None = None
        self.model: torch.nn.Module | None = None

    @classmethod
    def resident(cls, model: torch.nn.Module, *, context: int, n_tokens: int = 16384,
                 batch_size: int | None = None) -> "Scorer":
        """A scorer of weights held in memory (``score_vector``) for a model the caller built."""
        scorer = cls(n_tokens=n_tokens, batch_size=batch_size, context=context)
        scorer.model, scorer.device = model, next(model.parameters()).device
        return scorer

    def state(self, ref: CheckpointRef) -> dict[str, torch.Tensor]:
        path = Path(ref.path)
        if path not in self._states:
            reader = open_checkpoint(path)
            file_backed = reader.layout in ("safetensors", "torch") and self.device.type == "cpu"
            self._readers[path] = reader
            self._states[path] = {k: reader.get(k) if file_backed else reader.get(k).to(self.device, copy=True)
                                  for k in reader.keys()}
        return self._states[path]

    @property
    def context(self) -> int:
        if self._context is None:
            raise RuntimeError("context is known once a model is loaded; score something first or pass context=")
        return self._context

    def windows(self, data: str) -> torch.Tensor:
        if data not in self._windows:
            self._windows[data] = self.settings.windows(data, self.tokenizer, self.model, n_tokens=self.n_tokens,
                                                        context=self.context)
        return self._windows[data]

    def load(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float]) -> torch.nn.Module:
        """The model holding ``sum_i coeffs[i] * refs[i]`` (the first call builds it from ``refs[-1]``)."""
        if self.model is None:
            self._first_load(refs[-1])
        states = [self._fitted(r) for r in refs]
        merged = merge_state_dicts(states, coeffs, out_dtype=torch.float32, labels=[str(r.path) for r in refs])
        load_state_into(self.model, merged)  # cast to the model's dtype on its device
        return self.model

    def _first_load(self, ref: CheckpointRef) -> None:
        self.tokenizer = self.settings.tokenizer_for(ref.path)  # an error here is raised for text data only
        self.model = self.settings.load_model(ref.path)
        self.settings.check_tokenizer(self.tokenizer, self.model, ref.path)
        self._context = self._context or default_context(self.model)

    def _fitted(self, ref: CheckpointRef) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors under the model's names (raw checkpoints of custom architectures)."""
        state = self.state(ref)
        if not (self.settings.model_config or self.settings.model_factory):
            return state
        return fit_state(state, self.model, key_map=parse_key_map(self.settings.key_map), source=str(ref.path))

    def score(self, refs: Sequence[CheckpointRef], coeffs: Sequence[float], data: str, stop=None) -> EvalResult:
        return self._evaluate(self.load(refs, coeffs), data, stop)

    def score_vector(self, flat: torch.Tensor, data: str) -> EvalResult:
        """Score the flat weights ``flat`` (``parameters_to_vector`` order) in the resident model."""
        if self.model is None:
            raise RuntimeError("score_vector needs a model: build the scorer with Scorer.resident(model, ...)")
        params = list(self.model.parameters())
        torch.nn.utils.vector_to_parameters(flat.to(device=params[0].device, dtype=params[0].dtype), params)
        return self._evaluate(self.model, data)

    def _evaluate(self, model: torch.nn.Module, data: str, stop=None) -> EvalResult:
        return evaluate_sharded(model, self.windows(data), data=data, batch_size=self.batch_size, stop=stop,
                                byte_lengths=byte_lengths(self.tokenizer),
                                max_batch_tokens=self.settings.max_batch_tokens,
                                tokens_requested=planned_tokens(self.n_tokens, self.context))

    def forget(self, keep: Sequence[CheckpointRef] = ()) -> None:
        """Drop the views of every checkpoint not in ``keep`` (long sweeps over hundreds of checkpoints)."""
        wanted = {Path(r.path) for r in keep}
        for path in [p for p in self._states if p not in wanted]:
            del self._states[path]
            self._readers.pop(path).close()
