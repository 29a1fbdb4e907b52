"""Loss-spike detection over a training log: a loss jump or a grad-norm explosion against a trailing window.

    spikes = detect_spikes(read_log("runs/a/metrics.jsonl"))
    spikes[0].step, spikes[0].reason     # 412, "loss 3.41 is 0.87 above the trailing median 2.54"

A step is a spike when its loss exceeds the median of the previous ``window`` logged losses by more
than ``loss_jump`` nats, or its gradient norm exceeds ``grad_factor`` times their median gradient
norm. The median ignores earlier spikes, so one bad step does not hide the next. Consecutive spike
steps form one event, reported at its first step.

``SmoothedRise`` is the online rule the reproduction stops a diverging run with (docs/methods.md):
the mean of the last 10 losses 0.5 nats above its running minimum; ``first_smoothed_rise`` applies
it to a finished log.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
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


class SmoothedRise:
    """Online spike rule: the mean of the last ``smooth_steps`` losses rises ``rise`` nats above its running minimum.

    A non-finite loss fires too, once the first full window has set a minimum. The rule fires once;
    ``fired_step`` then holds the step. Feed every step's loss in order with ``update``; ``state_dict``
    and ``load_state_dict`` carry it through a restart, so a resumed run fires at the same step.

        rule = SmoothedRise(smooth_steps=10, rise=0.5)
        for step, loss in enumerate(losses, start=1):
            if rule.update(step, loss):
                print("spike at", step)
    """

    def __init__(self, smooth_steps: int = 10, rise: float = 0.5):
        if smooth_steps < 1:
            raise ValueError(f"smooth_steps must be at least 1, got {smooth_steps}")
        self.smooth_steps, self.rise = smooth_steps, rise
        self._recent: deque[float] = deque(maxlen=smooth_steps)
        self.best_mean = math.inf
        self.fired_step: int | None = None

    def update(self, step: int, loss: float) -> bool:
        """Take one step's training loss; True at the step the rule fires (once)."""
        self._recent.append(loss)
        finite = math.isfinite(loss)
        if self.fired_step is not None or (len(self._recent) < self.smooth_steps and finite):
            return False
        mean = sum(self._recent) / len(self._recent) if finite else math.inf
        if mean > self.best_mean + self.rise:
            self.fired_step = step
            return True
        self.best_mean = min(self.best_mean, mean)
        return False

    def state_dict(self) -> dict:
        return {"recent": list(self._recent), "best_mean": self.best_mean, "fired_step": self.fired_step}

    def load_state_dict(self, state: dict) -> None:
        self._recent = deque(state["recent"], maxlen=self.smooth_steps)
        self.best_mean, self.fired_step = state["best_mean"], state["fired_step"]


def first_smoothed_rise(records: list[dict], *, smooth_steps: int = 10, rise: float = 0.5) -> Spike | None:
    """The first step of a training log (``read_log``) where ``SmoothedRise`` fires, or None."""
    rule = SmoothedRise(smooth_steps, rise)
    for record in records:
        if rule.update(record["step"], record["loss"]):
            return Spike(record["step"], record["loss"], record.get("grad_norm"),
                         f"the {smooth_steps}-step mean loss rose more than {rise:g} above its running minimum "
                         f"{rule.best_mean:.3f}" if math.isfinite(record["loss"]) else "non-finite loss")
    return None
