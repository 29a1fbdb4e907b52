"""Loss-spike detection over a training log: a loss jump or a grad-norm explosion against a trailing window.

    spikes = detect_spikes(read_log("runs/a/metrics.jsonl"))
    spikes[0].step, spikes[0].reason     # 412, "loss 3.41 is 0.87 above the trailing median 2.54"

A step is a spike when its loss exceeds the median of the previous ``window`` logged losses by more
than ``loss_jump`` nats, or its gradient norm exceeds ``grad_factor`` times their median gradient
norm. The median ignores earlier spikes, so one bad step does not hide the next. Consecutive spike
steps form one event, reported at its first step.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import ConfigError


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    grad_norm: float | None
    reason: str


def read_log(path: str | Path) -> list[dict]:
    """Records with ``step`` and ``loss`` (and ``grad_norm`` when logged) from a JSONL training log."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no training log; pass --log with a JSONL file of step, loss[, grad_norm] records")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "loss" in r]
    if not records:
        raise ConfigError(f"{path}: no records with 'step' and 'loss'")
    return sorted(records, key=lambda r: r["step"])


def detect_spikes(records: list[dict], *, window: int = 50, loss_jump: float = 0.3, grad_factor: float = 10.0,
                  after_step: int = 0) -> list[Spike]:
    """Spike events (first step of each run of consecutive spike records), oldest first."""
    if window < 2:
        raise ValueError("window must be at least 2 records")
    spikes: list[Spike] = []
    calm: list[dict] = []  # trailing non-spike records
    previous_was_spike = False
    for record in records:
        reason = _spike_reason(record, calm[-window:], loss_jump, grad_factor) if len(calm) >= window else None
        if reason and record["step"] > after_step:
            if not previous_was_spike:
                spikes.append(Spike(record["step"], record["loss"], record.get("grad_norm"), reason))
            previous_was_spike = True
            continue
        previous_was_spike = False
        calm.append(record)
    return spikes


def _spike_reason(record: dict, trailing: list[dict], loss_jump: float, grad_factor: float) -> str | None:
    median_loss = statistics.median(r["loss"] for r in trailing)
    if record["loss"] - median_loss > loss_jump or record["loss"] != record["loss"]:
        return f"loss {record['loss']:.3f} is {record['loss'] - median_loss:.3f} above the trailing median {median_loss:.3f}"
    norms = [r["grad_norm"] for r in trailing if r.get("grad_norm") is not None]
    if record.get("grad_norm") is not None and norms:
        median_norm = statistics.median(norms)
        if record["grad_norm"] > grad_factor * median_norm:
            return f"grad norm {record['grad_norm']:.2f} is {record['grad_norm'] / median_norm:.1f}x the trailing median {median_norm:.2f}"
    return None
