"""The sizes of the reproduction (full, quick, test) and the user's overrides (design: docs/methods.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ckptmerge.errors import ConfigError

GROUPS = ("lawa", "bo", "pma")  # experiment groups: LAWA (E1-E4), BO merging (E5), PMA (E6-E9, E11)

SPAN_PRIMARY, SPAN_ABLATIONS = 0.05, (0.01, 0.20)
LAWA_K = 5
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # x the preset's reference LR: five LRs, a factor of 2 apart
HIGH_WITHIN = 0.03      # the high LR: the largest whose final loss is within 3% of the tuned one
EXTREME_WITHIN = 0.15   # the extreme arm: trained (finite) and within 15%


@dataclass(frozen=True)
class Scale:
    name: str
    lawa_steps: int
    wsd_steps: int
    spike_steps: int
    restart_steps: int
    batch_size: int
    eval_tokens: int
    seeds: tuple[int, ...] = (0, 1, 2)
    spike_extra_seeds: int = 1      # spike runs get one more seed: only those whose spike rule fired count
    batch_orders: int = 3           # restarts after a spike, each continued with this many batch orders
    extreme_arm: bool = True
    preset: str = "tiny"
    context: int = 64
    train_data: str = "shakespeare"
    eval_data: str = "shakespeare-val"
    schedule: str = "cosine"        # the LAWA runs' schedule
    reference_lr: float = 4e-3
    spike_lr_factor: float = 30.0   # the surge: LR x this over spike_surge_steps (tuned LR elsewhere; clipping off)
    spike_surge_at: float = 0.6     # ... from this fraction of the spike run

    @property
    def spike_surge_steps(self) -> int:
        """The surge's length: 1.5% of the spike run, at least 5 steps (22 at full scale, 5 at quick and test)."""
        return max(5, round(0.015 * self.spike_steps))

    @property
    def spike_surge(self) -> tuple[int, int, float]:
        """(first step, steps, LR factor) of the spike runs' LR surge (docs/methods.md, "Spike design")."""
        return round(self.spike_surge_at * self.spike_steps), self.spike_surge_steps, self.spike_lr_factor

    @property
    def warmup(self) -> int:
        return max(2, round(0.025 * self.lawa_steps))

    @property
    def wsd_every(self) -> int:
        """V0: the WSD runs' base checkpoint spacing (10 steps at 3000 stable steps)."""
        return max(1, round(self.wsd_steps / 300))

    def nu(self, span: float) -> int:
        """LAWA spacing for a window spanning ``span`` of the LAWA run (k checkpoints, k - 1 gaps)."""
        return max(1, round(span * self.lawa_steps / (LAWA_K - 1)))

    def span(self, nu: int) -> float:
        return (LAWA_K - 1) * nu / self.lawa_steps

    @property
    def sweep_lrs(self) -> tuple[float, ...]:
        return tuple(self.reference_lr * f for f in SWEEP_FACTORS)

    @property
    def spike_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) + tuple(max(self.seeds) + 1 + i for i in range(self.spike_extra_seeds))

    def describe(self) -> dict:
        return asdict(self)


FULL = Scale("full", lawa_steps=4000, wsd_steps=3000, spike_steps=1500, restart_steps=200, batch_size=16,
             eval_tokens=16384)
QUICK = Scale("quick", lawa_steps=300, wsd_steps=400, spike_steps=250, restart_steps=40, batch_size=8,
              eval_tokens=4096, extreme_arm=False)
TEST = Scale("test", lawa_steps=40, wsd_steps=60, spike_steps=40, restart_steps=8, batch_size=4, eval_tokens=1024,
             spike_extra_seeds=0, batch_orders=2, extreme_arm=False)
SCALES = {s.name: s for s in (FULL, QUICK, TEST)}


def make_scale(name: str, **overrides) -> Scale:
    """``SCALES[name]`` with the non-None overrides (seeds, train_data, eval_data, preset, batch_size, schedule)."""
    if name not in SCALES:
        raise ConfigError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "seeds" in given:
        given["seeds"] = tuple(int(s) for s in given["seeds"])
        if len(given["seeds"]) < 3 or len(set(given["seeds"])) != len(given["seeds"]):
            raise ConfigError("--seeds: give at least 3 distinct seeds (every claim is tested on >= 3 seeds)")
    if given.get("schedule", "cosine") not in ("cosine", "constant", "wsd"):
        raise ConfigError("--schedule: cosine, constant or wsd")
    if given.get("batch_size", 1) < 1:
        raise ConfigError("--batch-size: must be at least 1")
    return replace(SCALES[name], **given)
