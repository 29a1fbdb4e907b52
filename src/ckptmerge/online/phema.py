"""Power-function EMA snapshots for a post-hoc EMA (EDM2, Karras et al. 2024).

    avg = PowerEMASnapshots(sigma_rels=(0.05, 0.10), every=100)   # --average phema:sigma_rel=0.05/0.10,every=100
    for step in range(1, steps + 1):
        ...; optimizer.step()
        avg.update(model, step)                                    # every profile, every step
        if avg.snapshot_due(step):
            avg.save_snapshots("runs/a/phema", model)             # one HF folder per profile

Each profile is a ``PowerEMA`` updated every step; every ``every`` steps each is saved as
``FOLDER/sigma_rel-0.050-step-000100/`` whose ``ckptmerge.json`` records the step and the profile
(``averaged.kind == "power_ema"``, ``averaged.gamma``). ``discover`` reads the folder as a checkpoint series
and ``ckptmerge merge FOLDER --schedule phema:sigma_rel=0.07`` reconstructs the EMA of any other width
(``merging/power_profiles.py``). Read as one average (``swapped``, ``save``), the averager is its first profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ckptmerge.online.averager import Averager
from ckptmerge.online.rules import PowerEMA


def snapshot_name(step: int, sigma_rel: float) -> str:
    """``sigma_rel-0.050-step-000100``: the step itself is read from the snapshot's ``ckptmerge.json``."""
    return f"sigma_rel-{sigma_rel:.3f}-step-{step:06d}"


class PowerEMASnapshots(Averager):
    """Several power-function EMAs updated every step, saved together every ``every`` steps."""

    kind = "phema"

    def __init__(self, sigma_rels: Sequence[float] | None = (0.05, 0.10), *, every: int,
                 gammas: Sequence[float] | None = None, offload: bool = False):
        super().__init__(every=every, offload=offload)
        if (sigma_rels is None) == (gammas is None):
            raise ValueError("phema needs sigma_rel=... or gamma=... (one or more, separated by /), not both")
        if sigma_rels is not None:
            self.profiles = [PowerEMA(s, offload=offload) for s in sigma_rels]
        else:
            self.profiles = [PowerEMA(gamma=g, offload=offload) for g in gammas]
        names = [snapshot_name(0, p.sigma_rel) for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"phema profiles must differ (to 3 decimals of sigma_rel), got "
                             f"{[p.sigma_rel for p in self.profiles]}")

    def params(self) -> dict:
        return {"every": self.every, "sigma_rels": [p.sigma_rel for p in self.profiles],
                "gammas": [p.gamma for p in self.profiles]}

    def should_update(self, step: int) -> bool:
        return True  # every profile folds in every step; ``every`` spaces the snapshots

    def snapshot_due(self, step: int) -> bool:
        """Whether ``step`` (just folded in) is a snapshot step."""
        return self.last_step == step and step % self.every == 0

    def update(self, model: torch.nn.Module, step: int, tokens_seen: int | None = None) -> bool:
        folded = [p.update(model, step, tokens_seen) for p in self.profiles]  # every profile, no short cut
        if not any(folded):
            return False
        self.n_averaged += 1
        self.last_step, self.last_tokens = step, tokens_seen
        self._layout = self.profiles[0]._layout
        return True

    def save_snapshots(self, folder: str | Path, model: torch.nn.Module, *, format: str = "hf",
                       extra_meta: dict | None = None) -> list[Path]:
        """Write every profile's average as one snapshot folder in ``folder`` (a collective under torch.distributed)."""
        return [p.save(Path(folder) / snapshot_name(self.last_step, p.sigma_rel), model, format=format,
                       extra_meta=extra_meta) for p in self.profiles]

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The first profile's average."""
        return self.profiles[0].averaged_state_dict()

    @contextmanager
    def swapped(self, model: torch.nn.Module):
        with self.profiles[0].swapped(model) as swapped:
            yield swapped

    def save(self, path, model, *, format: str = "hf", extra_meta: dict | None = None) -> Path:
        """The first profile as one averaged folder (a power-EMA snapshot)."""
        return self.profiles[0].save(path, model, format=format, extra_meta=extra_meta)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params(), "n_averaged": self.n_averaged,
                "last_step": self.last_step, "last_tokens": self.last_tokens, "layout": self._layout,
                "profiles": [p.state_dict() for p in self.profiles]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or state["params"] != self.params():
            raise ValueError(f"state is for {state['kind']} {state['params']}, not {self.kind} {self.params()}")
        for profile, saved in zip(self.profiles, state["profiles"]):
            profile.load_state_dict(saved)
        self.n_averaged, self.last_step = state["n_averaged"], state["last_step"]
        self.last_tokens = state["last_tokens"]
        self._layout = state.get("layout")
