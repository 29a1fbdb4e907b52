"""Training runs of the reproduction, with weight snapshots kept in memory at exactly the steps the claims need.

A run is described by a ``RunSpec``; ``train_run`` trains it with the project's trainer loop
(``train/loop.py``: the same optimizer, clipping, LR schedules and batches as ``ckptmerge train``),
per-step EMAs kept by ``online/`` averagers, and the spike rule of ``recovery/spikes.py``. A callback
keeps flat fp32 snapshots of the weights (and of the EMAs) at ``snap_steps``; ``WORK/<name>/trajectory.pt``
is published when the run is done. Every ``resume_every`` steps it writes ``resume.pt`` (the trainer's
resumable state plus the trajectory so far), so a run cut off picks up where it stopped. Files are
written through ``io/publish.py``, so ``ckptmerge clean`` knows a killed writer's temporaries.
``train_many`` runs specs two at a time in single-thread worker processes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.scoring import merge_vectors
from ckptmerge.io.publish import atomic_file
from ckptmerge.online.rules import EMA
from ckptmerge.recovery.spikes import SmoothedRise
from ckptmerge.train.config import TrainConfig
from ckptmerge.train.loop import TrainState, make_optimizer, optimizer_state_copy, run_steps

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
    watch_spikes: bool = False              # stop post_spike_steps after a detected spike; keep pre-spike states
    post_spike_steps: int = 0
    surge: tuple = ()                       # (first step, steps, factor): the LR times factor over those steps

    def train_config(self) -> TrainConfig:
        """The trainer's settings for this run (AdamW and weight decay at the trainer's defaults)."""
        config = SurgeConfig if self.surge else TrainConfig
        extra = {"surge": tuple(self.surge)} if self.surge else {}
        return config(**extra, preset=self.preset, steps=self.steps, lr=self.lr, schedule=self.schedule,
                      warmup_steps=self.warmup, decay_steps=self.decay_steps,
                      min_lr_ratio=self.min_lr_ratio if self.schedule == "cosine" else 0.0,
                      batch_size=self.batch_size, context=self.context, seed=self.seed,
                      data_seed=self.data_seed, data=self.data, grad_clip=self.grad_clip)


@dataclass
class SurgeConfig(TrainConfig):
    """A run whose LR is ``factor`` times the schedule's for ``steps`` steps from ``first`` (the spike design).

    ``lr(step)`` is the rate of the update from ``step`` to ``step + 1``, so the surge's updates are the ones
    that reach steps ``first + 1`` ... ``first + steps``. A run forked or restarted inside or before the surge
    sees the same surge at the same steps.
    """

    surge: tuple = (0, 0, 1.0)

    def lr_schedule(self):
        base, (first, steps, factor) = super().lr_schedule(), self.surge
        return lambda step: base(step) * (factor if first <= step < first + steps else 1.0)


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
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _ema_name(decay: float) -> str:
    return f"ema-{decay:g}"


def _ema_flat(averager: EMA, model: torch.nn.Module) -> torch.Tensor:
    """The average's parameters as one flat vector, in ``model.parameters()`` order."""
    averaged = averager.averaged_state_dict()
    return torch.cat([averaged[name].reshape(-1) for name, _ in model.named_parameters()])


class _Recorder:
    """The callback after each step: the log, snapshots, fork states, the spike rule, resume files."""

    def __init__(self, spec: RunSpec, folder: Path, traj: Trajectory):
        self.spec, self.folder, self.traj = spec, folder, traj
        self.snap_steps, self.state_steps = set(spec.snap_steps), set(spec.state_steps)
        self.resume_every = max(50, spec.steps // 4)
        self.detector = SmoothedRise(SPIKE_SMOOTH, SPIKE_RISE)
        self.recent: deque = deque(maxlen=SPIKE_SMOOTH + 4)  # pre-spike candidates; covers design.pre_spike()

    def __call__(self, state: TrainState, record: dict) -> bool:
        step, value, traj = record["step"], record["loss"], self.traj
        traj.log.append([step, value, record["grad_norm"]])
        self._keep(state, step)
        if self.spec.watch_spikes and self._watch(state, step, value):
            return True
        if not math.isfinite(value):
            traj.diverged = True
            return True
        if step % self.resume_every == 0 and step < self.spec.steps:
            _save_resume(self.spec, self.folder, state, self)
        return False

    def _keep(self, state: TrainState, step: int) -> None:
        if step in self.snap_steps:
            self.traj.snaps[step] = _flat(state.model)
            for d in self.spec.ema_decays:
                self.traj.emas[d][step] = _ema_flat(state.averagers[_ema_name(d)], state.model)
        if step in self.state_steps:
            self.traj.states[step] = {"weights": _flat(state.model), "optimizer": optimizer_state_copy(state.optimizer)}

    def _watch(self, state: TrainState, step: int, value: float) -> bool:
        """Feed the spike rule; until it fires keep the full states at the latest snapshot steps. True: stop."""
        traj = self.traj
        if step in self.snap_steps and traj.spike_step is None:
            self.recent.append((step, {"weights": _flat(state.model),
                                       "optimizer": optimizer_state_copy(state.optimizer)}))
        if self.detector.update(step, value):
            traj.spike_step = step
            traj.states.update(dict(self.recent))
        return traj.spike_step is not None and step >= traj.spike_step + self.spec.post_spike_steps

    def state_dict(self) -> dict:
        return {"trajectory": asdict(self.traj), "detector": self.detector.state_dict(), "recent": list(self.recent)}

    def load_state_dict(self, saved: dict) -> None:
        self.traj = Trajectory(**saved["trajectory"])
        self.detector.load_state_dict(saved["detector"])
        self.recent.extend(tuple(r) for r in saved["recent"])


def train_run(spec: RunSpec, work: str | Path) -> str:
    """Train ``spec`` into ``work/spec.name`` (or resume it, or reuse it when done); returns the name."""
    from ckptmerge.data.tokens import load_tokens

    work = Path(work)
    folder = work / spec.name
    if (folder / TRAJECTORY).is_file():
        return spec.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    config = spec.train_config()
    state, recorder = _start_or_resume(spec, work, folder)
    run_steps(config, state, load_tokens(spec.data), [recorder])
    recorder.traj.final_step = state.step
    _atomic_save(asdict(recorder.traj), folder / TRAJECTORY)
    (folder / RESUME).unlink(missing_ok=True)
    return spec.name


def _initial(spec: RunSpec, work: Path) -> TrainState:
    """The seeded model (or the state it forks from), its optimizer, and EMAs seeded with its weights."""
    from ckptmerge.train.presets import build_model

    model = build_model(spec.preset, spec.seed)
    state = TrainState(model, make_optimizer(model, spec.train_config()), 0,
                       averagers={_ema_name(d): EMA(decay=d) for d in spec.ema_decays})
    if spec.start_from:
        run, step = spec.start_from.rsplit(":", 1)
        saved = load_trajectory(work, run).states[int(step)]
        torch.nn.utils.vector_to_parameters(saved["weights"], model.parameters())
        state.optimizer.load_state_dict(saved["optimizer"])
        state.step = int(step)
    if spec.init_weights:
        snaps = [_snapshot(work, ref) for ref, _ in spec.init_weights]
        merged = merge_vectors(snaps, [c for _, c in spec.init_weights])
        torch.nn.utils.vector_to_parameters(merged, model.parameters())
    for averager in state.averagers.values():  # the EMA starts from the initial weights (step 0 of the sum)
        averager.update(model, state.step)
    return state


def _snapshot(work: Path, ref: str) -> torch.Tensor:
    run, step = ref.rsplit(":", 1)
    return load_trajectory(work, run).snaps[int(step)]


def _start_or_resume(spec: RunSpec, work: Path, folder: Path) -> tuple[TrainState, _Recorder]:
    """The trainer's state and the run's recorder: fresh, or as ``resume.pt`` left them."""
    state = _initial(spec, work)
    recorder = _Recorder(spec, folder, Trajectory(emas={d: {} for d in spec.ema_decays}))
    if (folder / RESUME).is_file():
        saved = torch.load(folder / RESUME, map_location="cpu", weights_only=True)
        if "train" not in saved:  # written by the loop this one replaced: train the run again from the start
            return state, recorder
        if saved["spec"] != asdict(spec):
            raise ConfigError(f"{folder} holds a run with other settings; remove it or use another --work")
        state.load_state_dict(saved["train"])
        recorder.load_state_dict(saved)
    return state, recorder


def _save_resume(spec: RunSpec, folder: Path, state: TrainState, recorder: _Recorder) -> None:
    _atomic_save({"spec": asdict(spec), "train": state.state_dict(), **recorder.state_dict()}, folder / RESUME)


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
