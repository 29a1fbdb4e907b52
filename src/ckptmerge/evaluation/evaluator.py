"""Held-out loss of causal LMs on fixed token windows, with standard errors.

Every model compared sees the same windows (``ckptmerge.data.batches.eval_windows``). The loss
is the token-level mean cross-entropy in nats per token (per byte with the byte tokenizer); its
standard error is taken over windows. ``paired_difference`` gives the SE of a difference between
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


@dataclass
class EvalResult:
    """Loss of one model on one data set."""

    data: str
    loss: float
    stderr: float
    tokens: int
    window_losses: list[float] = field(repr=False, default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"data": self.data, "loss": self.loss, "stderr": self.stderr, "perplexity": self.perplexity,
                "tokens": self.tokens, "windows": len(self.window_losses)}


def evaluate_model(model: torch.nn.Module, windows: torch.Tensor, *, data: str = "", batch_size: int = 16,
                   bf16: bool = False, stop: Callable[[float, int], bool] | None = None) -> EvalResult:
    """Mean next-token loss of ``model`` over ``windows`` (n, context + 1), without touching disk.

    ``stop(mean_so_far, batches_done)`` is asked after each batch; when it returns True the evaluation
    ends early and the result covers only the windows scored so far (used to prune search trials).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_window = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in windows.split(batch_size):
            batch = batch.to(device, non_blocking=True)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            targets = batch[:, 1:]
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            per_window.append(losses.view(targets.shape).mean(dim=1).cpu())
            if stop is not None and stop(float(torch.cat(per_window).double().mean()), len(per_window)):
                break
    model.train(was_training)
    window_losses = torch.cat(per_window).double().numpy()
    return summarize(data, window_losses, tokens=len(window_losses) * (windows.shape[1] - 1))


def summarize(data: str, window_losses: np.ndarray, tokens: int) -> EvalResult:
    """Mean loss and its standard error over windows."""
    n = len(window_losses)
    stderr = float(window_losses.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return EvalResult(data, float(window_losses.mean()), stderr, tokens, window_losses.tolist())


def paired_difference(a: EvalResult, b: EvalResult) -> tuple[float, float]:
    """(mean of a - b, its standard error), window by window. Both must use the same windows."""
    if len(a.window_losses) != len(b.window_losses):
        raise ValueError("paired_difference needs results on the same windows")
    diff = np.asarray(a.window_losses) - np.asarray(b.window_losses)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se


SIGNIFICANT_SE = 2.0  # a difference counts when it exceeds two paired standard errors (~95%)


def verdict(diff: float, se: float, better: str, worse: str) -> str:
    """'better' / 'worse' when |diff| > 2 SE (lower loss is better), else 'within noise of'."""
    if abs(diff) <= SIGNIFICANT_SE * se:
        return "within noise of"
    return better if diff < 0 else worse


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place (strict; tied weights may be given once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise KeyError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")


def load_model(path, *, device: str | None = None, device_map: str | None = None) -> torch.nn.Module:
    """An HF causal LM from a folder (raw, merged, or any user checkpoint), in fp32.

    ``device_map="auto"`` (accelerate) spreads a model too large for one device over all visible devices.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load is noise in sweeps and searches
    if device_map is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device) if device else model
