"""CheckpointRef: what ckptmerge knows about one checkpoint of a series before reading tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run.

    Attributes:
        path: the checkpoint folder or file.
        step: optimizer step parsed from the name or read from metadata; None when unknown.
        tokens_seen: training tokens consumed at this checkpoint; None when unknown.
        lr: learning rate at save time; None when unknown.
        layout: reader layout name (``safetensors``, ``torch``, ``dcp``); see ``ckptmerge.io.detect_layout``.
        framework: the trainer layout recognised (``lightning``, ``deepspeed``, ...; io/layouts/), or "".
        meta_source: where step / tokens / lr came from (``name``, ``trainer_state.json``, ...).
        ema_gamma: for a power-function EMA snapshot (``train --average phema:...``), its profile's exponent
            (``ckptmerge.json``'s ``averaged.gamma``); None for training weights.
    """

    path: Path
    step: int | None = None
    tokens_seen: int | None = None
    lr: float | None = None
    layout: str = ""
    meta_source: tuple[str, ...] = field(default_factory=tuple)
    framework: str = ""
    ema_gamma: float | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        """Short human label, e.g. ``step-000500 (step 500)``."""
        return f"{self.name} (step {self.step})" if self.step is not None else self.name
