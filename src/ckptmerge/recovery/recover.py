"""Recover from a loss spike with PMA-init: restart from the SMA of the last N pre-spike checkpoints.

    ckptmerge recover runs/high-lr                       # first spike in metrics.jsonl, SMA of 3, keep Adam state
    ckptmerge recover runs/high-lr --n 3 --optimizer-state reset --baseline --steps 800 -o runs/high-lr-recover

``OUT/merged`` is the merge, ``OUT/restart-merged`` the run restarted from it (forked from the last
pre-spike checkpoint, whose optimizer state is kept or reset), and with ``--baseline`` also
``OUT/restart-last``, the same restart from the last pre-spike checkpoint itself, so the two can be
compared step for step (``ckptmerge.recovery.spikes`` is run over both logs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ckptmerge.errors import ConfigError, SelectionError
from ckptmerge.io.remote import refuse_urls
from ckptmerge.merging.discover import discover
from ckptmerge.merging.offline import merge
from ckptmerge.merging.schedules import compute_coeffs
from ckptmerge.recovery.spikes import Spike, detect_spikes, read_log
from ckptmerge.train.config import config_from_dict
from ckptmerge.train.trainer import METRICS, RUN_CONFIG, train_or_resume


@dataclass
class RecoverConfig:
    n: int = 3
    optimizer_state: str = "keep"
    spike_step: int | None = None     # default: the first detected spike
    steps: int | None = None          # restart until this step; default: the original run's length
    baseline: bool = False            # also restart from the last pre-spike checkpoint, unmerged
    window: int = 50                  # spike detector: trailing records
    loss_jump: float = 0.3            # nats above the trailing median
    grad_factor: float = 10.0         # times the trailing median grad norm


@dataclass
class RecoverResult:
    spike: Spike | None
    spike_step: int
    merged_from: list[str]
    runs: dict[str, str] = field(default_factory=dict)
    spikes_after: dict[str, list[dict]] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


def find_spike(run_dir: Path, cfg: RecoverConfig) -> tuple[Spike | None, int]:
    if cfg.spike_step is not None:
        return None, cfg.spike_step
    spikes = detect_spikes(read_log(run_dir / METRICS), window=cfg.window, loss_jump=cfg.loss_jump,
                           grad_factor=cfg.grad_factor)
    if not spikes:
        raise SelectionError(f"{run_dir / METRICS}: no loss spike or grad-norm explosion found (loss jump "
                             f"{cfg.loss_jump} nats, grad factor {cfg.grad_factor}x over {cfg.window} records); "
                             "lower the thresholds or pass --spike-step")
    return spikes[0], spikes[0].step


def recover(run_dir: str | Path, cfg: RecoverConfig, out: str | Path, *, progress: bool = True, log=print) -> RecoverResult:
    """Merge the last ``cfg.n`` checkpoints before the spike and restart training from the merge."""
    refuse_urls("recover", "it restarts a local ckptmerge training run; `ckptmerge merge URL --last N -o OUT` merges "
                "the pre-spike checkpoints of a run at a URL", run_dir=run_dir, output=out)
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: no {RUN_CONFIG}; recover restarts ckptmerge training runs "
                          "(merge the pre-spike checkpoints with `ckptmerge merge` for other trainers)")
    spike, spike_step = find_spike(run_dir, cfg)
    before = [r for r in discover(run_dir).checkpoints if r.step < spike_step]
    if len(before) < cfg.n:
        raise SelectionError(f"only {len(before)} checkpoints before the spike at step {spike_step}; need --n {cfg.n}")
    window = before[-cfg.n:]
    log(f"spike at step {spike_step}" + (f": {spike.reason}" if spike else " (given)")
        + f"; merging {', '.join(r.name for r in window)}")
    merge(window, compute_coeffs("sma", window), out / "merged", force=True, progress=False,
          recipe={"schedule": "sma", "recover": {"spike_step": spike_step, "n": cfg.n}})
    original = config_from_dict(json.loads((run_dir / RUN_CONFIG).read_text()), str(run_dir / RUN_CONFIG))
    restart = replace(original, fork_from=str(window[-1].path), init_from=None, optimizer_state=cfg.optimizer_state,
                      steps=cfg.steps or original.steps)
    starts = {"restart-merged": replace(restart, init_from=str(out / "merged"))}
    if cfg.baseline:
        starts["restart-last"] = restart
    result = RecoverResult(spike, spike_step, [str(r.path) for r in window])
    for name, config in starts.items():
        log(f"== {name}: from step {window[-1].step}, optimizer state {cfg.optimizer_state}, to step {config.steps}")
        train_or_resume(config, out / name, progress=progress)
        before_fork = [r for r in read_log(run_dir / METRICS) if r["step"] <= window[-1].step]
        records = before_fork + read_log(out / name / METRICS)  # the detector needs the trailing window
        result.runs[name] = str(out / name)
        result.spikes_after[name] = [asdict(s) for s in detect_spikes(
            records, window=cfg.window, loss_jump=cfg.loss_jump, grad_factor=cfg.grad_factor,
            after_step=window[-1].step)]
        result.final_loss[name] = records[-1]["loss"]
    (out / "recover.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
