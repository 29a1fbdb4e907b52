"""The training runs the reproduction experiments share, at full or quick scale.

Every run is trained once into ``WORK/<name>-seed<k>`` and reused by every experiment that needs it
(``train_or_resume`` refuses a folder holding a run with other settings). All use the ``tiny``
preset (0.82M parameters), byte-level Shakespeare, AdamW (0.9, 0.95), weight decay 0.1, batch 16 x 128.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ckptmerge.train.checkpointing import checkpoint_name
from ckptmerge.train.config import TrainConfig
from ckptmerge.train.trainer import train_or_resume


@dataclass(frozen=True)
class Scale:
    """Sizes of every run and evaluation; ``QUICK`` keeps the structure and shrinks the numbers."""

    seeds: tuple[int, ...] = (0, 1)
    eval_tokens: int = 16384
    # LAWA runs (E1-E4): cosine schedules at a base and a high LR, online EMA / SWA / LAWA averagers
    lawa_steps: int = 1000
    lawa_save_every: int = 50
    lawa_lrs: tuple[float, float] = (2e-3, 1e-2)
    # WSD runs (E5-E8, E10): constant LR with a checkpoint every V steps, anneal branch forked near the end
    wsd_steps: int = 1000
    wsd_save_every: int = 20
    wsd_lr: float = 6e-3
    anneal_steps: int = 200
    early_step: int = 400
    # spike runs (E4, E9): a constant LR high enough for loss spikes and grad-norm explosions
    spike_steps: int = 400
    spike_save_every: int = 10
    spike_lr: float = 3e-2
    restart_steps: int = 80
    # continued training (E10)
    ct_steps: int = 100
    ct_lr: float = 3e-3
    warmup_steps: int = 50


FULL = Scale()
QUICK = Scale(eval_tokens=2048, lawa_steps=40, lawa_save_every=4, wsd_steps=80, wsd_save_every=5, anneal_steps=20,
              early_step=50, spike_steps=40, spike_save_every=5, restart_steps=10, ct_steps=10, warmup_steps=5)


def lawa_averagers(scale: Scale) -> list[str]:
    """EMA at three decays, SWA from the start and from 75%, LAWA k=5 at spacings 1, 10 and 2x the save interval."""
    late = int(0.75 * scale.lawa_steps)
    return ["ema:decay=0.9", "ema:decay=0.99", "ema:decay=0.999", "swa:start_step=0,every=10",
            f"swa:start_step={late},every=10", "lawa:k=5,every=1", "lawa:k=5,every=10",
            f"lawa:k=5,every={2 * scale.lawa_save_every}"]


def lawa_run(work: Path, scale: Scale, lr: float, seed: int, progress: bool) -> Path:
    config = TrainConfig(preset="tiny", steps=scale.lawa_steps, lr=lr, schedule="cosine", min_lr_ratio=0.1,
                         warmup_steps=scale.warmup_steps, save_every=scale.lawa_save_every, seed=seed,
                         average=lawa_averagers(scale), keep_trainer_state=1)
    return train_or_resume(config, work / f"lawa-lr{lr:g}-seed{seed}", progress=progress)


def wsd_run(work: Path, scale: Scale, seed: int, progress: bool) -> tuple[Path, Path]:
    """The constant-LR run and its anneal branch (LR linearly to 0 over the last ``anneal_steps``)."""
    stable = TrainConfig(preset="tiny", steps=scale.wsd_steps, lr=scale.wsd_lr, warmup_steps=scale.warmup_steps,
                         save_every=scale.wsd_save_every, seed=seed)
    stable_dir = train_or_resume(stable, work / f"wsd-seed{seed}", progress=progress)
    fork = scale.wsd_steps - scale.anneal_steps
    anneal = replace(stable, schedule="wsd", decay_steps=scale.anneal_steps,
                     fork_from=str(stable_dir / checkpoint_name(fork)))
    return stable_dir, train_or_resume(anneal, work / f"wsd-anneal-seed{seed}", progress=progress)


def spike_run(work: Path, scale: Scale, seed: int, progress: bool) -> Path:
    config = TrainConfig(preset="tiny", steps=scale.spike_steps, lr=scale.spike_lr, warmup_steps=scale.warmup_steps,
                         save_every=scale.spike_save_every, log_every=1, seed=seed)
    return train_or_resume(config, work / f"spike-seed{seed}", progress=progress)


def build_all(work: Path, scale: Scale, progress: bool = True, seeds: tuple[int, ...] | None = None) -> None:
    """Train every shared run (the experiments also build what they need on demand)."""
    for seed in seeds or scale.seeds:
        for lr in scale.lawa_lrs:
            lawa_run(work, scale, lr, seed, progress)
        wsd_run(work, scale, seed, progress)
        spike_run(work, scale, seed, progress)
