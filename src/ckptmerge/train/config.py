"""TrainConfig: everything that defines a training run (saved as ``run.json``; YAML keys are the field names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptmerge.errors import ConfigError
from ckptmerge.io.yaml_config import dataclass_from_dict
from ckptmerge.online.spec import parse_average_spec
from ckptmerge.train.lr_schedules import DECAY_SHAPES, SCHEDULE_NAMES, LrSchedule
from ckptmerge.train.presets import PRESETS, preset_context


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as ``run.json``; YAML keys are these names)."""

    preset: str = "tiny"
    steps: int = 1000
    lr: float = 3e-3
    schedule: str = "constant"
    warmup_steps: int = 100
    decay_steps: int | None = None
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    batch_size: int = 16
    context: int | None = None
    grad_accum: int = 1
    save_every: int = 100
    seed: int = 0             # the model's initialization and (unless data_seed) the batch order
    data_seed: int | None = None  # the batch order on its own: forks that see other batches from one start
    data: str = "shakespeare"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_data: str = "shakespeare-val"
    eval_tokens: int = 16384
    log_every: int = 10
    keep_trainer_state: int = 0  # keep optimizer / RNG state in only the newest K checkpoints (0: in all)
    fork_from: str | None = None
    init_from: str | None = None
    optimizer_state: str = "keep"
    average: list[str] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def batch_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def seq_len(self) -> int:
        return self.context or preset_context(self.preset)

    def lr_schedule(self) -> LrSchedule:
        decay = self.decay_steps if self.decay_steps is not None else round(self.decay_fraction * self.steps)
        return LrSchedule(self.schedule, self.lr, self.warmup_steps, self.steps,
                          decay_steps=decay if self.schedule == "wsd" else 0,
                          decay_shape=self.decay_shape, min_lr_ratio=self.min_lr_ratio)


def validate_config(c: TrainConfig) -> list[str]:
    problems = []
    if c.preset not in PRESETS:
        problems.append(f"preset: {c.preset!r} is not one of {list(PRESETS)}")
    if c.schedule not in SCHEDULE_NAMES:
        problems.append(f"schedule: {c.schedule!r} is not one of {SCHEDULE_NAMES}")
    if c.decay_shape not in DECAY_SHAPES:
        problems.append(f"decay_shape: {c.decay_shape!r} is not one of {list(DECAY_SHAPES)}")
    if c.optimizer_state not in ("keep", "reset"):
        problems.append("optimizer_state: keep or reset")
    for key in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
        if getattr(c, key) < 1:
            problems.append(f"{key}: must be at least 1")
    if c.keep_trainer_state < 0:
        problems.append("keep_trainer_state: 0 (all) or a positive count")
    if c.lr <= 0:
        problems.append("lr: must be positive")
    for spec in c.average:
        try:
            parse_average_spec(spec)
        except ConfigError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            c.lr_schedule()
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def config_from_dict(data: dict, source: str) -> TrainConfig:
    return dataclass_from_dict(TrainConfig, data, source=source, validate=validate_config)
