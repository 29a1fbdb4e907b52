"""Held-out loss of causal LMs on fixed token windows, with standard errors.

Every model compared sees the same windows (``ckptmerge.data.batches.eval_windows``). The loss
is the token-level mean cross-entropy in nats per token; ``bits_per_byte`` divides the total by the
UTF-8 bytes of the scored text (x ln 2), which compares across tokenizers. The standard error is
taken over windows. ``paired_difference`` gives the SE of a difference between
two models on the same windows, which is much smaller than either SE alone: use it to tell a
merge's gain from noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ckptmerge.data.batches import PAD
from ckptmerge.errors import ConfigError, DataError
from ckptmerge.evaluation.loading import load_model, load_state_into, model_vocab_size

__all__ = ["EvalResult", "evaluate_model", "load_model", "load_state_into", "paired_difference", "summarize", "verdict"]


@dataclass
class EvalResult:
    """Loss of one model on one data set: nats per token, bits per byte, and what was scored.

    ``window_losses`` are the mean losses of each window and ``window_tokens`` their scored tokens
    (equal except for a short last window), so results from several workers can be pooled.
    """

    data: str
    loss: float  # nats per token
    stderr: float
    tokens: int  # tokens actually scored (can be fewer than asked for: see ``tokens_requested``)
    window_losses: list[float] = field(repr=False, default_factory=list)
    bytes: int = 0  # UTF-8 bytes of the scored tokens; 0 when no tokenizer says what they stand for
    window_tokens: list[int] = field(repr=False, default_factory=list)
    tokens_requested: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        """Total nats / (UTF-8 bytes x ln 2): comparable across tokenizers."""
        return self.loss * self.tokens / (self.bytes * math.log(2)) if self.bytes else None

    @property
    def short(self) -> bool:
        """True when the data held fewer tokens than requested, so every token was scored once."""
        return self.tokens_requested is not None and self.tokens < self.tokens_requested

    def metric(self, name: str) -> float | None:
        """``loss`` (nats/token) or ``bits_per_byte``; any other name is a ConfigError listing these."""
        check_metric(name)
        return self.bits_per_byte if name == "bits_per_byte" else self.loss

    def to_dict(self) -> dict:
        return {"data": self.data, "loss": self.loss, "unit": "nats/token", "stderr": self.stderr,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "tokens": self.tokens,
                "bytes": self.bytes, "windows": len(self.window_losses), "tokens_requested": self.tokens_requested}


METRICS = ("loss", "bits_per_byte")


def check_metric(name: str, flag: str = "--objective") -> str:
    """``name`` when it is one of ``METRICS``; otherwise a one-line ConfigError naming ``flag`` and the known names."""
    if name not in METRICS:
        raise ConfigError(f"{flag} {name!r}: unknown metric; choose one of {', '.join(METRICS)}")
    return name


def evaluate_model(model: torch.nn.Module, windows: torch.Tensor, *, data: str = "", batch_size: int = 16,
                   bf16: bool = False, stop: Callable[[float, int], bool] | None = None,
                   byte_lengths: np.ndarray | None = None, max_batch_tokens: int | None = None,
                   tokens_requested: int | None = None) -> EvalResult:
    """Mean next-token loss of ``model`` over ``windows`` (n, context + 1; ``PAD`` past a short end).

    ``byte_lengths[id]`` (UTF-8 bytes per token id) gives the byte count behind ``bits_per_byte``.
    Batches hold at most ``batch_size`` rows and, when given, ``max_batch_tokens`` tokens.
    ``stop(mean_so_far, batches_done)`` is asked after each batch; when it returns True the evaluation
    ends early and the result covers only the windows scored so far (used to prune search trials).
    """
    device = next(model.parameters()).device
    check_vocab(model, windows, data)
    rows = rows_per_batch(batch_size, max_batch_tokens, windows.shape[1] - 1)
    was_training = model.training
    model.eval()
    sums, counts = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in windows.split(rows):
            batch = batch.to(device, non_blocking=True)
            targets = batch[:, 1:]
            logits = _logits(model(batch[:, :-1].clamp(min=0))).float()
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=PAD)
            sums.append(losses.view(targets.shape).sum(dim=1).double().cpu())
            counts.append((targets != PAD).sum(dim=1).cpu())
            if stop is not None and stop(float(torch.cat(sums).sum() / torch.cat(counts).sum()), len(sums)):
                break
    model.train(was_training)
    window_tokens = torch.cat(counts).numpy()
    window_losses = torch.cat(sums).numpy() / window_tokens
    scored = windows[:len(window_tokens), 1:]
    n_bytes = count_bytes(scored, byte_lengths) if byte_lengths is not None else 0
    return summarize(data, window_losses, window_tokens, n_bytes=n_bytes, tokens_requested=tokens_requested)


def rows_per_batch(batch_size: int, max_batch_tokens: int | None, context: int) -> int:
    if max_batch_tokens is None:
        return max(1, batch_size)
    return max(1, min(batch_size, max_batch_tokens // max(1, context)))


def _logits(output) -> torch.Tensor:
    """Logits from an HF output, a plain tensor, or a (logits, ...) tuple (nanoGPT-style modules)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


def check_vocab(model: torch.nn.Module, windows: torch.Tensor, data: str) -> None:
    """Refuse ids the model has no embedding for (an index crash, or a device assert on GPU, otherwise)."""
    vocab = model_vocab_size(model)
    top = int(windows.max()) if windows.numel() else -1
    if vocab is not None and top >= vocab:
        raise DataError(f"--data {data}: token id {top} is outside the model's vocabulary of {vocab}; the data was "
                        "tokenized with another tokenizer (or read with the wrong --token-dtype)")


def count_bytes(targets: torch.Tensor, byte_lengths: np.ndarray) -> int:
    ids = targets[targets != PAD].numpy()
    table = np.asarray(byte_lengths)
    if ids.size and int(ids.max()) >= len(table):  # ids past the tokenizer (padded vocab rows) stand for no text
        table = np.pad(table, (0, int(ids.max()) + 1 - len(table)))
    return int(table[ids].sum())


def summarize(data: str, window_losses: np.ndarray, window_tokens: np.ndarray, *, n_bytes: int = 0,
              tokens_requested: int | None = None) -> EvalResult:
    """Token-weighted mean over windows and its standard error (the usual SE when windows are equal)."""
    losses, weights = np.asarray(window_losses, dtype=np.float64), np.asarray(window_tokens, dtype=np.float64)
    n, total = len(losses), float(weights.sum())
    mean = float((losses * weights).sum() / total)
    stderr = _weighted_se(losses - mean, weights / total) if n > 1 else float("nan")
    return EvalResult(data, mean, stderr, int(total), losses.tolist(), n_bytes, [int(t) for t in window_tokens],
                      tokens_requested)


def _weighted_se(deviations: np.ndarray, shares: np.ndarray) -> float:
    n = len(deviations)
    return float(math.sqrt(n / (n - 1) * float((shares ** 2 * deviations ** 2).sum())))


def paired_difference(a: EvalResult, b: EvalResult) -> tuple[float, float]:
    """(mean of a - b, its standard error), window by window. Both must use the same windows."""
    if len(a.window_losses) != len(b.window_losses):
        raise ValueError("paired_difference needs results on the same windows")
    diff = np.asarray(a.window_losses) - np.asarray(b.window_losses)
    weights = np.asarray(a.window_tokens or [1] * len(diff), dtype=np.float64)
    shares = weights / weights.sum()
    mean = float((diff * shares).sum())
    return mean, (_weighted_se(diff - mean, shares) if len(diff) > 1 else float("nan"))


SIGNIFICANT_SE = 2.0  # a difference counts when it exceeds two paired standard errors (~95%)


def verdict(diff: float, se: float, better: str, worse: str) -> str:
    """'better' / 'worse' when |diff| > 2 SE (lower loss is better), else 'within noise of'."""
    if abs(diff) <= SIGNIFICANT_SE * se:
        return "within noise of"
    return better if diff < 0 else worse
