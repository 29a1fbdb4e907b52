"""Which runs the reproduction trains, and at which steps each keeps snapshots (docs/methods.md)."""

from __future__ import annotations

from ckptmerge.reproduce.scale import LAWA_K, SPAN_ABLATIONS, SPAN_PRIMARY, Scale
from ckptmerge.reproduce.training import SPIKE_SMOOTH, RunSpec

LAWA_POINTS = (0.25, 0.5, 0.75, 1.0)
N_VALUES, V_FACTORS = (3, 6, 10, 15), (1, 2, 4)
PAIR_POINTS, PAIR_GAPS = (0.3, 0.6, 0.9), (1, 4)


def lawa_spans(s: Scale) -> dict[str, int]:
    return {"1%": s.nu(SPAN_ABLATIONS[0]), "5%": s.nu(SPAN_PRIMARY), "20%": s.nu(SPAN_ABLATIONS[1])}


def ema_decays(s: Scale) -> tuple[float, ...]:
    """Per-step EMA 0.9, 0.99, 0.998 and the one whose half-life equals LAWA's mean lag (2 nu)."""
    lag = (LAWA_K - 1) / 2 * s.nu(SPAN_PRIMARY)
    return 0.9, 0.99, 0.998, round(0.5 ** (1 / lag), 6)


def window(end: int, n: int, every: int) -> list[int]:
    return [end - j * every for j in range(n - 1, -1, -1)]


def lawa_points(s: Scale, steps: int | None = None) -> list[int]:
    steps = steps or s.lawa_steps
    return [max(1, round(f * steps)) for f in LAWA_POINTS]


def lawa_snaps(s: Scale) -> tuple[int, ...]:
    wanted = set()
    for t in lawa_points(s):
        for nu in lawa_spans(s).values():
            wanted.update(x for x in window(t, LAWA_K, nu) if x >= 1)
    return tuple(sorted(wanted))


def lawa_spec(s: Scale, lr: float, seed: int) -> RunSpec:
    return RunSpec(f"lawa-lr{lr:g}-seed{seed}", lr, s.lawa_steps, s.schedule, s.warmup, seed, s.batch_size, s.context,
                   s.preset, s.train_data, decay_steps=max(1, s.lawa_steps // 5) if s.schedule == "wsd" else 0,
                   snap_steps=lawa_snaps(s), ema_decays=ema_decays(s))


def batch4_spec(s: Scale, lr: float, seed: int) -> RunSpec:
    steps = max(4, s.lawa_steps // 4)
    return RunSpec(f"batch4-lr{lr:g}-seed{seed}", lr, steps, s.schedule, max(1, s.warmup // 4), seed,
                   4 * s.batch_size, s.context, s.preset, s.train_data,
                   decay_steps=max(1, steps // 5) if s.schedule == "wsd" else 0,
                   snap_steps=(steps // 2,), ema_decays=(0.9,))


def wsd_points(s: Scale) -> dict[str, int]:
    v = s.wsd_every
    snap = lambda f: max(v, round(f * s.wsd_steps / v) * v)  # noqa: E731
    return {"early": snap(0.25), "mid": snap(0.5), "late": s.wsd_steps, "fork": snap(0.8)}


def pairs(s: Scale) -> dict[str, tuple[int, int]]:
    v = s.wsd_every
    out = {}
    for f in PAIR_POINTS:
        end = max(5 * v, round(f * s.wsd_steps / v) * v)
        for g in PAIR_GAPS:
            out[f"{f:.0%} gap {g}V0"] = (end - g * v, end)
    out["distant"] = (max(v, round(0.1 * s.wsd_steps / v) * v), round(0.9 * s.wsd_steps / v) * v)
    return out


def wsd_snaps(s: Scale) -> tuple[int, ...]:
    v, p = s.wsd_every, wsd_points(s)
    wanted = set()
    for t in (p["early"], p["late"], p["mid"]):
        for f in V_FACTORS:
            for n in N_VALUES:
                wanted.update(window(t, n, f * v))
    for a, b in pairs(s).values():
        wanted.update((a, b))
    return tuple(sorted(x for x in wanted if x >= 1))


def wsd_spec(s: Scale, lr: float, seed: int) -> RunSpec:
    return RunSpec(f"wsd-lr{lr:g}-seed{seed}", lr, s.wsd_steps, "constant", s.warmup, seed, s.batch_size, s.context,
                   s.preset, s.train_data, snap_steps=wsd_snaps(s), state_steps=(wsd_points(s)["fork"],))


def anneal_spec(s: Scale, lr: float, seed: int) -> RunSpec:
    fork, v = wsd_points(s)["fork"], s.wsd_every
    stable = wsd_spec(s, lr, seed)
    return RunSpec(f"anneal-lr{lr:g}-seed{seed}", lr, s.wsd_steps, "wsd", s.warmup, seed, s.batch_size, s.context,
                   s.preset, s.train_data, decay_steps=s.wsd_steps - fork,
                   snap_steps=tuple(range(fork + v, s.wsd_steps + 1, v)), start_from=f"{stable.name}:{fork}")


def spike_every(s: Scale) -> int:
    return max(1, round(s.spike_steps / 100))


def spike_spec(s: Scale, tuned_lr: float, seed: int) -> RunSpec:
    """Constant tuned LR, clipping off, and an LR surge (``s.spike_surge``) 60% into the run: a spike at a known step.

    The rule of ``recovery/spikes.py`` (fixed in advance: 10-step mean 0.5 nats above its running minimum)
    decides whether and where the run spiked; the run stops 10 snapshots + 10 steps after it fires.
    """
    every = spike_every(s)
    return RunSpec(f"spike-seed{seed}", tuned_lr, s.spike_steps, "constant", s.warmup, seed, s.batch_size, s.context,
                   s.preset, s.train_data, grad_clip=0.0, snap_steps=tuple(range(every, s.spike_steps + 1, every)),
                   watch_spikes=True, post_spike_steps=10 * every + SPIKE_SMOOTH, surge=s.spike_surge)


def pre_spike(s: Scale, spike_step: int) -> int:
    """The last snapshot before the rise that triggered the detector."""
    every = spike_every(s)
    return (spike_step - SPIKE_SMOOTH) // every * every


def restart_specs(s: Scale, spike: RunSpec, spike_step: int) -> dict[str, list[RunSpec]]:
    """Restarts from the last pre-spike checkpoint and from the SMA of the 3 before it, several batch orders."""
    every, last = spike_every(s), pre_spike(s, spike_step)
    merged = tuple((f"{spike.name}:{last - j * every}", 1 / 3) for j in range(3))
    end = last + s.restart_steps
    out = {"last": [], "merged": []}
    for order in range(s.batch_orders):
        common = dict(lr=spike.lr, steps=end, schedule="constant", warmup=spike.warmup, seed=spike.seed,
                      batch_size=spike.batch_size, context=spike.context, preset=spike.preset, data=spike.data,
                      data_seed=1000 + 10 * spike.seed + order, grad_clip=0.0, snap_steps=(end,),
                      start_from=f"{spike.name}:{last}", surge=spike.surge)
        out["last"].append(RunSpec(f"restart-last-seed{spike.seed}-order{order}", **common))
        out["merged"].append(RunSpec(f"restart-merged-seed{spike.seed}-order{order}", init_weights=merged, **common))
    return out
