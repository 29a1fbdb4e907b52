"""Training runs of the reproduction, with weight snapshots kept in memory at exactly the steps the claims need.

A run is described by a ``RunSpec``; ``train_run`` trains it with the trainer's optimizer, clipping
and batches, keeps flat fp32 snapshots of the weights (and of per-step EMAs) at ``snap_steps``, and
publishes ``WORK/<name>/trajectory.pt`` when done. Every ``resume_every`` steps it writes
``resume.pt`` atomically, so a run cut off picks up where it stopped. ``train_many`` runs specs two at
a time in single-thread worker processes.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TRAJECTORY, RESUME = "trajectory.pt", "resume.pt"
SPIKE_SMOOTH, SPIKE_RISE = 10, 0.5  # spike: 10-step mean training loss 0.5 nats above its running minimum


@dataclass(frozen=True)
class RunSpec:
    name: str
    lr: float
    steps: int
    schedule: str            # cosine | constant | wsd
    warmup: int
    seed: int
    batch_size: int
    context: int
    preset: str = "tiny"
    data: str = "shakespeare"
    data_seed: int | None = None           # batch order (default: the seed)
    grad_clip: float = 1.0                  # <= 0: clipping off
    decay_steps: int = 0                    # wsd
    min_lr_ratio: float = 0.1               # cosine floor
    snap_steps: tuple[int, ...] = ()
    state_steps: tuple[int, ...] = ()       # full (weights + Adam) states kept for forks
    ema_decays: tuple[float, ...] = ()
    start_from: str | None = None           # "run:step" whose state (weights + Adam) this run starts from
    init_weights: tuple[tuple[str, float], ...] = ()  # ("run:step", coeff): weights replaced by this merge
    watch_spikes: bool = False              # stop SPIKE_SMOOTH * 5 steps after a detected spike; keep pre-spike states
    post_spike_steps: int = 0

    def schedule_fn(self):
        from ckptmerge.train.lr_schedules import LrSchedule

        return LrSchedule(self.schedule, self.lr, self.warmup, self.steps, decay_steps=self.decay_steps,
                          min_lr_ratio=self.min_lr_ratio if self.schedule == "cosine" else 0.0)


@dataclass
class Trajectory:
    snaps: dict = field(default_factory=dict)       # step -> flat fp32 weights
    emas: dict = field(default_factory=dict)        # decay -> {step: flat}
    states: dict = field(default_factory=dict)      # step -> {"weights": flat, "optimizer": state_dict}
    log: list = field(default_factory=list)         # [step, loss, grad_norm]
    spike_step: int | None = None
    diverged: bool = False
    final_step: int = 0


def trajectory_path(work: Path, name: str) -> Path:
    return Path(work) / name / TRAJECTORY


def load_trajectory(work: Path, name: str) -> Trajectory:
    return Trajectory(**torch.load(trajectory_path(work, name), map_location="cpu", weights_only=True))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def _initial(spec: RunSpec, work: Path):
    from ckptmerge.train.config import TrainConfig
    from ckptmerge.train.presets import build_model
    from ckptmerge.train.trainer import make_optimizer

    model = build_model(spec.preset, spec.seed)
    optimizer = make_optimizer(model, TrainConfig(lr=spec.lr))
    start = 0
    if spec.start_from:
        run, step = spec.start_from.rsplit(":", 1)
        state = load_trajectory(work, run).states[int(step)]
        torch.nn.utils.vector_to_parameters(state["weights"], model.parameters())
        optimizer.load_state_dict(state["optimizer"])
        start = int(step)
    if spec.init_weights:
        flat = sum(c * _snapshot(work, ref) for ref, c in spec.init_weights).float()
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
    return model, optimizer, start


def _snapshot(work: Path, ref: str) -> torch.Tensor:
    run, step = ref.rsplit(":", 1)
    return load_trajectory(work, run).snaps[int(step)].double()


@dataclass
class SpikeWatch:
    """The spike detector: a 10-step mean training loss 0.5 nats above its running minimum (or a non-finite
    loss). Until it fires it keeps the full states at the latest snapshot steps, the pre-spike candidates."""

    smooth: deque = field(default_factory=lambda: deque(maxlen=SPIKE_SMOOTH))
    recent: deque = field(default_factory=lambda: deque(maxlen=SPIKE_SMOOTH + 4))  # covers pre_spike()
    best_smooth: float = math.inf

    def update(self, traj: Trajectory, step: int, value: float, snapped: bool, state) -> None:
        """Feed one step's loss; ``state()`` is called for the full state when ``snapped``."""
        self.smooth.append(value)
        if snapped and traj.spike_step is None:
            self.recent.append((step, state()))
        mean = sum(self.smooth) / len(self.smooth) if math.isfinite(value) else math.inf
        if traj.spike_step is None and (len(self.smooth) == SPIKE_SMOOTH or not math.isfinite(value)):
            if mean > self.best_smooth + SPIKE_RISE:
                traj.spike_step = step
                traj.states.update({s: st for s, st in self.recent})
            self.best_smooth = min(self.best_smooth, mean)

    def state_dict(self) -> dict:
        return {"smooth": list(self.smooth), "recent": list(self.recent), "best_smooth": self.best_smooth}

    def load_state_dict(self, saved: dict) -> None:
        self.smooth.extend(saved["smooth"])
        self.recent.extend(tuple(r) for r in saved["recent"])
        self.best_smooth = saved["best_smooth"]


@dataclass
class _Progress:
    """What a run carries from step to step (and through ``resume.pt``)."""

    step: int
    traj: Trajectory
    emas: dict
    watch: SpikeWatch


def train_run(spec: RunSpec, work: str | Path) -> str:
    """Train ``spec`` into ``work/spec.name`` (or resume it, or reuse it when done); returns the name."""
    from ckptmerge.data.tokens import load_tokens

    work = Path(work)
    folder = work / spec.name
    if (folder / TRAJECTORY).is_file():
        return spec.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model, optimizer, run = _start_or_resume(spec, work, folder)
    tokens, schedule = load_tokens(spec.data), spec.schedule_fn()
    snap_steps, state_steps = set(spec.snap_steps), set(spec.state_steps)
    resume_every = max(50, spec.steps // 4)
    while run.step < spec.steps:
        value, grad_norm = _train_step(spec, model, optimizer, tokens, schedule(run.step), run.step)
        run.step += 1
        step, traj = run.step, run.traj
        traj.log.append([step, value, grad_norm])
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        for d, ema in run.emas.items():
            ema.mul_(d).add_(flat, alpha=1 - d)
        if step in snap_steps:
            traj.snaps[step] = flat.clone()
            for d in spec.ema_decays:
                traj.emas[d][step] = run.emas[d].clone()
        if step in state_steps:
            traj.states[step] = {"weights": flat.clone(), "optimizer": optimizer.state_dict()}
        if spec.watch_spikes:
            run.watch.update(traj, step, value, step in snap_steps,
                             lambda: {"weights": flat.clone(), "optimizer": _copy_state(optimizer)})
            if traj.spike_step is not None and step >= traj.spike_step + spec.post_spike_steps:
                break
        if not math.isfinite(value):
            traj.diverged = True
            break
        if step % resume_every == 0 and step < spec.steps:
            _save_resume(spec, folder, flat, optimizer, run)
    run.traj.final_step = run.step
    _atomic_save(asdict(run.traj), folder / TRAJECTORY)
    (folder / RESUME).unlink(missing_ok=True)
    return spec.name


def _train_step(spec: RunSpec, model, optimizer, tokens, lr: float, step: int) -> tuple[float, float]:
    """One optimizer step at ``lr`` on the batch of ``step``; returns the loss and the gradient norm."""
    from ckptmerge.data.batches import train_batch
    from ckptmerge.train.trainer import clip_gradients

    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = train_batch(tokens, seed=spec.seed if spec.data_seed is None else spec.data_seed, step=step, micro=0,
                       batch_size=spec.batch_size, context=spec.context)
    loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    grad_norm = clip_gradients(model.parameters(), spec.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm


def _start_or_resume(spec: RunSpec, work: Path, folder: Path):
    """The model, its optimizer and the run's progress: fresh, or as ``resume.pt`` left them."""
    model, optimizer, step = _initial(spec, work)
    emas = {d: torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone() for d in spec.ema_decays}
    run = _Progress(step, Trajectory(emas={d: {} for d in spec.ema_decays}), emas, SpikeWatch())
    if (folder / RESUME).is_file():
        saved = torch.load(folder / RESUME, map_location="cpu", weights_only=True)
        if saved["spec"] != asdict(spec):
            raise ValueError(f"{folder} holds a run with other settings; remove it")
        torch.nn.utils.vector_to_parameters(saved["weights"], model.parameters())
        optimizer.load_state_dict(saved["optimizer"])
        run = _Progress(saved["step"], Trajectory(**saved["trajectory"]), saved["emas"], SpikeWatch())
        if "watch" in saved:  # files from before the detector's state was saved restart it
            run.watch.load_state_dict(saved["watch"])
    return model, optimizer, run


def _save_resume(spec: RunSpec, folder: Path, flat: torch.Tensor, optimizer, run: _Progress) -> None:
    _atomic_save({"spec": asdict(spec), "weights": flat.clone(), "optimizer": optimizer.state_dict(),
                  "trajectory": asdict(run.traj), "emas": run.emas, "step": run.step,
                  "watch": run.watch.state_dict()}, folder / RESUME)


def _copy_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    return {"state": {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
                      for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def train_many(specs: Sequence[RunSpec], work: Path, workers: int = 2, log=print) -> None:
    """Train every spec not yet done, ``workers`` at a time (each a single-thread process)."""
    todo = [s for s in specs if not trajectory_path(work, s.name).is_file()]
    if not todo:
        return
    log(f"   training {len(todo)} runs, {workers} at a time: {', '.join(s.name for s in todo)}")
    if workers <= 1 or len(todo) == 1:
        for spec in todo:
            train_run(spec, work)
            log(f"   done {spec.name}")
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name in pool.map(train_run, todo, [str(work)] * len(todo)):
            log(f"   done {name}")
