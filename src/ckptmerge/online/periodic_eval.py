"""Periodic evaluation during training: the averaged and the training weights of the live model on the same windows.

    evaluation = PeriodicEval(["heldout.jsonl"], every=200, tokens=32768)   # the model's own tokenizer
    for step in range(1, steps + 1):
        ...; optimizer.step(); avg.update(model, step)
        metrics = avg.evaluate(model, step, evaluation)                     # {} unless step % 200 == 0

Each data set is read and cut into windows once, at the first evaluation (text is tokenized once and cached on
disk by ``data/tokens.py``); every evaluation then scores the same windows with the training weights, and with
each averager's weights swapped in (``Averager.swapped``: the training weights are restored after). The live model
is scored where it is, in its own dtype; ``EvalSettings`` gives the rest (batch size, text field, token dtype,
tokenizer). Windows hold ``context`` tokens (default: the HF config's max positions, at most 1024). Under
torch.distributed every rank must call ``evaluate`` (each scores a block of the windows).

The tokenizer: ``tokenizer=`` (a folder, a ``tokenizer.json``, a transformers tokenizer or a ``TextTokenizer``),
else ``EvalSettings.tokenizer``, else the trainer's (``default_tokenizer``: HF ``processing_class``), else the one
beside the model's ``config._name_or_path``. Token files (``.bin``, ``.npy``) need none.

Metric names are watch's (``online/watch_eval.py``), ``<label>`` the averager's (its kind by default):

    eval/raw/<data>/loss                   eval/raw/<data>/bits_per_byte
    eval/merged/<label>/<data>/loss        eval/merged/<label>/<data>/bits_per_byte
    eval/merged/<label>/<data>/delta_vs_raw       (averaged minus training weights, nats/token, paired by window)
    eval/merged/<label>/<data>/delta_vs_raw_se    (its standard error)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ckptmerge.data.batches import planned_tokens
from ckptmerge.data.text_tokenizer import TextTokenizer, load_tokenizer
from ckptmerge.errors import ConfigError, TokenizerError
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import EvalResult
from ckptmerge.evaluation.runner import default_context
from ckptmerge.evaluation.settings import EvalSettings, byte_lengths, require_tokenizer
from ckptmerge.online.watch_eval import eval_metrics

if TYPE_CHECKING:
    from ckptmerge.online.averager import Averager


class PeriodicEval:
    """Held-out data, how often and how much of it to score; the windows once built."""

    def __init__(self, data: Sequence[str] | str, *, every: int, tokens: int = 32768, tokenizer=None,
                 context: int | None = None, settings: EvalSettings | None = None):
        self.data = [data] if isinstance(data, str) else list(data)
        problems = [p for p, bad in ((f"every must be at least 1, got {every}", every < 1),
                                     (f"tokens must be at least 1, got {tokens}", tokens < 1),
                                     ("data is empty: name at least one held-out data set", not self.data)) if bad]
        if problems:
            raise ConfigError(f"periodic evaluation: {'; '.join(problems)}")
        self.every, self.tokens, self.tokenizer, self.context = every, tokens, tokenizer, context
        self.settings = settings or EvalSettings(progress=False)
        _refuse_model_settings(self.settings)
        self._windows: dict[str, torch.Tensor] | None = None
        self._byte_lengths = None

    @classmethod
    def from_options(cls, eval_every: int | None, data, tokens: int, tokenizer,
                     settings: EvalSettings | None) -> PeriodicEval | None:
        """The callbacks' keyword arguments: None when ``eval_every`` is not given (and no data either)."""
        if eval_every is None:
            if data:
                raise ConfigError("data was given without eval_every: pass eval_every=N to evaluate every N steps")
            return None
        return cls(data, every=eval_every, tokens=tokens, tokenizer=tokenizer, settings=settings)

    def is_due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def evaluate(self, model: torch.nn.Module, averagers: Mapping[str, Averager], *,
                 default_tokenizer=None) -> dict[str, float]:
        """Metrics of the training weights and of each averager (by label) with an update; see the module docstring."""
        windows = self._windows_for(model, default_tokenizer)
        raw = self._score(model, windows)
        merged = {}
        for label, averager in averagers.items():
            if averager.n_averaged:
                with averager.swapped(model):
                    merged[label] = self._score(model, windows)
        return eval_metrics(raw, merged)

    def _score(self, model: torch.nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, EvalResult]:
        return {name: evaluate_sharded(model, rows, data=name, batch_size=self.settings.batch_size,
                                       max_batch_tokens=self.settings.max_batch_tokens, byte_lengths=self._byte_lengths,
                                       tokens_requested=planned_tokens(self.tokens, rows.shape[1] - 1))
                for name, rows in windows.items()}

    def _windows_for(self, model: torch.nn.Module, default_tokenizer) -> dict[str, torch.Tensor]:
        if self._windows is None:
            tokenizer = self._resolve_tokenizer(model, default_tokenizer)
            require_tokenizer(tokenizer, self.data)
            self.settings.check_tokenizer(tokenizer, model, "the training model")
            context = self.context or default_context(_hf_model(model))
            self._byte_lengths = byte_lengths(tokenizer)
            self._windows = {name: self.settings.windows(name, tokenizer, model, n_tokens=self.tokens, context=context)
                             for name in self.data}
        return self._windows

    def _resolve_tokenizer(self, model: torch.nn.Module, default_tokenizer) -> TextTokenizer | TokenizerError:
        given = next((t for t in (self.tokenizer, self.settings.tokenizer, default_tokenizer) if t is not None), None)
        if isinstance(given, TextTokenizer):
            return given
        if hasattr(given, "save_pretrained"):
            return _from_transformers(given)
        if given is not None:
            return load_tokenizer(given)
        folder = _model_folder(model)
        if folder is None:
            return TokenizerError("periodic evaluation: no tokenizer given and the model names no local folder; "
                                  "pass tokenizer= (a folder, a tokenizer.json or the tokenizer object the model "
                                  "trains with)")
        return self.settings.tokenizer_for(folder)


def _refuse_model_settings(settings: EvalSettings) -> None:
    """The live model is scored where it is, in its own dtype: settings that would load or move a model are
    refused rather than ignored."""
    defaults = EvalSettings()
    ignored = [f"{name}={getattr(settings, name)!r}" for name in ("device", "dtype", "model_config", "model_factory",
                                                                    "key_map", "device_map")
               if getattr(settings, name) != getattr(defaults, name)]
    if ignored:
        raise ConfigError(f"periodic evaluation scores the training model where it is and in its own dtype; "
                          f"{', '.join(ignored)} cannot apply: leave them at their defaults")


def _from_transformers(hf_tokenizer) -> TextTokenizer:
    """A transformers tokenizer object as evaluation reads tokenizers (saved once to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="ckptmerge-tokenizer-") as folder:
        hf_tokenizer.save_pretrained(folder)
        return replace(load_tokenizer(folder), name=type(hf_tokenizer).__name__)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost module with an HF ``config``: the model itself, or the one a LightningModule wraps."""
    return next((m for m in model.modules() if getattr(m, "config", None) is not None), model)


def _model_folder(model: torch.nn.Module) -> str | None:
    """The local folder an HF model (or a module holding one) was loaded from, when it names one."""
    name = getattr(getattr(_hf_model(model), "config", None), "_name_or_path", None)
    return name if name and Path(name).exists() else None
