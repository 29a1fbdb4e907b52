"""PMA (Li et al., 2025): E6 merge vs anneal, E7 weightings, E8 V and N, E9 restart after a spike."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ckptmerge.reproduce.context import ANNEAL_MARGIN, SPIKE_MARGIN, Context
from ckptmerge.reproduce.design import (
    N_VALUES,
    V_FACTORS,
    anneal_spec,
    pre_spike,
    restart_specs,
    spike_spec,
    window,
    wsd_points,
    wsd_spec,
)
from ckptmerge.reproduce.report import Experiment, line_plot, markdown_table
from ckptmerge.reproduce.stats import Claim, combine, pooled
from ckptmerge.reproduce.training import SPIKE_SMOOTH

PAPER = "Li et al., *Model Merging in Pre-training of Large Language Models* (PMA), 2025"
N_DEFAULT = 10
EVAL_POINTS = 12  # anneal steps evaluated for the earliest-step search (evenly spaced)


def setup(ctx: Context) -> str:
    s, p = ctx.scale, wsd_points(ctx.scale)
    return (f"`{s.preset}` model, context {s.context}, batch {s.batch_size}, `{s.train_data}`, AdamW (0.9, 0.95), "
            f"wd 0.1, clip 1.0. WSD: warm-up {s.warmup}, constant tuned LR {ctx.lrs['tuned']:g} for {s.wsd_steps} "
            f"steps; an anneal branch forked at step {p['fork']} (80%) decays the LR linearly to 0 by step "
            f"{s.wsd_steps}. Base spacing V0 = {s.wsd_every} steps. Seeds {list(s.seeds)}. Held-out loss on "
            f"`{ctx.in_domain}`, {s.eval_tokens} tokens. Margins: {ANNEAL_MARGIN:.0%} of the anneal gain (raw "
            "constant-LR minus annealed at the end, half A) of the same seed.")


def coeffs(method: str, n: int) -> list[float]:
    """SMA, WMA (newest largest) or PMA's EMA recursion with alpha (oldest first; they sum to 1)."""
    if method == "sma":
        return [1 / n] * n
    if method == "wma":
        return [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    alpha = float(method.split(":")[1])
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - 1 - i) for i in range(1, n)]


class WsdRun:
    def __init__(self, ctx: Context, seed: int):
        lr = ctx.lrs["tuned"]
        self.ctx, self.name, self.anneal = ctx, wsd_spec(ctx.scale, lr, seed).name, anneal_spec(ctx.scale, lr, seed).name
        self.p, self.v = wsd_points(ctx.scale), ctx.scale.wsd_every

    def raw(self, t: int):
        return self.ctx.raw(self.name, t)

    def merged(self, t: int, n: int = N_DEFAULT, every: int | None = None, method: str = "sma"):
        steps = window(t, n, every or self.v)
        return self.ctx.merged(self.name, steps, coeffs(method, n)) if steps[0] >= 1 else None

    def annealed(self, t: int | None = None):
        return self.ctx.raw(self.anneal, t or self.ctx.scale.wsd_steps)

    def margin(self) -> float:
        end = self.ctx.scale.wsd_steps
        return ANNEAL_MARGIN * abs(self.ctx.diff(self.raw(end), self.annealed(), "A")[0])


def e6(ctx: Context) -> Experiment:
    s = ctx.scale
    end = s.wsd_steps
    c = [Claim("E6a", "the merged constant-LR model beats the raw constant-LR checkpoint", "less",
               f"SMA(N={N_DEFAULT}, V0) - raw, constant LR, end of the stable phase", primary=True),
         Claim("E6b", "the merged constant-LR model matches the annealed model", "equivalent",
               f"SMA(N={N_DEFAULT}, V0) of the constant run - annealed, end"),
         Claim("E6c", "merging early-anneal checkpoints is comparable to the end of the anneal", "equivalent",
               "SMA(N=3, V0) of anneal checkpoints ending a third into the decay - annealed final"),
         Claim("E6d", "merging checkpoints deep in the anneal gives no gain", "equivalent",
               "SMA(N=3, V0) of the last anneal checkpoints - annealed final")]
    rows, earliest, curve = [], {}, {}
    fork = wsd_points(s)["fork"]
    for seed in s.seeds:
        run = WsdRun(ctx, seed)
        m = run.margin()
        merged, raw, ann = run.merged(end), run.raw(end), run.annealed()
        c[0].add(seed, ctx.diff(merged, raw), m)
        c[1].add(seed, ctx.diff(merged, ann), m)
        eligible = [t for t in sorted(ctx.traj(run.anneal).snaps) if t - 2 * run.v > fork]
        third = min(t for t in eligible if t >= fork + (end - fork) / 3)
        steps = sorted({*eligible[::max(1, len(eligible) // EVAL_POINTS)], third, end})
        sma3 = {t: ctx.merged(run.anneal, window(t, 3, run.v)) for t in steps}
        c[2].add(seed, ctx.diff(sma3[third], ann), m)
        c[3].add(seed, ctx.diff(sma3[end], ann), m)
        gain, recovered = ctx.diff(raw, ann), ctx.diff(raw, merged)
        within = [t for t in sorted(sma3) if abs(ctx.diff(sma3[t], ann)[0]) + 2 * ctx.diff(sma3[t], ann)[1] <= m]
        earliest[seed] = within[0] if within else None
        rows.append([seed, ctx.mean(raw), ctx.mean(merged), ctx.mean(ann), f"{gain[0]:+.4f}",
                     f"{recovered[0] / gain[0]:.0%}" if gain[0] else "n/a", earliest[seed] or "none",
                     f"{(end - earliest[seed]) * s.batch_size * s.context}" if earliest[seed] else "0"])
        if seed == s.seeds[0]:
            curve["SMA(3) of anneal checkpoints"] = (sorted(sma3), [ctx.mean(sma3[t]) for t in sorted(sma3)])
            curve["annealed (raw anneal branch)"] = (steps, [ctx.mean(ctx.raw(run.anneal, t)) for t in steps])

    def draw(folder: Path) -> None:
        line_plot(folder / "anneal.png", curve, title=f"Anneal branch and its SMA(3), seed {s.seeds[0]}",
                  xlabel="step", ylabel=f"held-out loss ({ctx.in_domain})")

    return Experiment("e6-pma-vs-anneal", "E6: merging constant-LR checkpoints vs annealing (WSD)", PAPER,
                      "Merging constant-LR checkpoints gives a model that beats the raw checkpoint and approaches the "
                      "annealed model at the same token count; merging early-anneal checkpoints is comparable to the "
                      "end of the anneal (tokens saved), merging annealed checkpoints gains little.", setup(ctx), c,
                      ["Fraction of the anneal gain recovered by the merge, and the earliest anneal step from which "
                       "SMA(3) of anneal checkpoints is within the margin of the final annealed model (per seed, "
                       "|d| + 2 SE <= margin, half B):\n\n" + markdown_table(
                           ["seed", "raw constant", f"SMA N={N_DEFAULT}", "annealed", "anneal gain", "recovered",
                            "earliest step within margin", "tokens saved"], rows)],
                      ["anneal.png"], data={"rows": rows, "earliest": earliest}, draw=draw)


def e7(ctx: Context) -> Experiment:
    s = ctx.scale
    p = wsd_points(s)
    methods = ["sma", "wma", "ema:0.1", "ema:0.2"]
    c = [Claim("E7a", "early: WMA beats SMA", "less", f"WMA - SMA, N={N_DEFAULT}, V0, at 25% of the stable phase"),
         Claim("E7b", "early: EMA alpha 0.2 beats EMA alpha 0.1", "less", "EMA(0.2) - EMA(0.1), at 25%"),
         Claim("E7c", "late: the methods are about equal", "equivalent",
               "worst - best method (both chosen on half A), end of the stable phase")]
    rows = []
    for seed in s.seeds:
        run = WsdRun(ctx, seed)
        m = run.margin()
        early = {k: run.merged(p["early"], method=k) for k in methods}
        late = {k: run.merged(p["late"], method=k) for k in methods}
        c[0].add(seed, ctx.diff(early["wma"], early["sma"]), m)
        c[1].add(seed, ctx.diff(early["ema:0.2"], early["ema:0.1"]), m)
        order = sorted(methods, key=lambda k: ctx.mean(late[k], "A"))
        c[2].add(seed, ctx.diff(late[order[-1]], late[order[0]]), m)
        for label, at, t in (("early", early, p["early"]), ("late", late, p["late"])):
            rows.append([seed, label, f"{ctx.mean(run.raw(t)):.4f}", *[f"{ctx.mean(at[k]):.4f}" for k in methods]])
    return Experiment("e7-weighting-schemes", "E7: SMA, WMA and EMA weightings early and late", PAPER,
                      "Early in training WMA is best and EMA(0.2) beats EMA(0.1); late in training the differences "
                      "vanish.", setup(ctx), c,
                      [markdown_table(["seed", "point", "raw", *methods], rows)], data={"rows": rows})


def e8(ctx: Context) -> Experiment:
    s = ctx.scale
    p, v = wsd_points(s), s.wsd_every
    vs = [f * v for f in V_FACTORS]
    c = [Claim("E8a", "early: the widest window is worse than no merge", "greater",
               "SMA over the widest N x V window that fits - raw, at 25% of the stable phase"),
         Claim("E8b", "late: more checkpoints help (N=15 beats N=3)", "less", f"SMA N=15 - SMA N=3, V={v}, end",
               primary=True),
         Claim("E8c1", "late: the first increment (N 3 -> 6) is a gain", "less", "SMA N=6 - SMA N=3, V0, end"),
         Claim("E8c2", "late: the later increment (N 10 -> 15) is a gain", "less", "SMA N=15 - SMA N=10, V0, end"),
         Claim("E8c3", "late: the later increment is smaller (diminishing returns)", "greater",
               "(L15 - L10) - (L6 - L3), V0, end; SEs in quadrature")]
    rows = []
    for seed in s.seeds:
        run = WsdRun(ctx, seed)
        m = run.margin()
        fits = [(n, every) for n in N_VALUES for every in vs if p["early"] - (n - 1) * every >= 1]
        n_w, v_w = max(fits, key=lambda x: (x[0] * x[1], x[0]))
        c[0].add(seed, ctx.diff(run.merged(p["early"], n_w, v_w), run.raw(p["early"])), m)
        c[0].note = f"widest window that fits at the early point: N={n_w}, V={v_w}"
        at = {n: run.merged(p["late"], n, v) for n in N_VALUES}
        c[1].add(seed, ctx.diff(at[15], at[3]), m)
        inc1, inc2 = ctx.diff(at[6], at[3]), ctx.diff(at[15], at[10])
        c[2].add(seed, inc1, m)
        c[3].add(seed, inc2, m)
        c[4].add(seed, combine(inc2, inc1), m)
        for label in ("early", "late"):
            raw = run.raw(p[label])
            for every in vs:
                gains = []
                for n in N_VALUES:
                    merged = run.merged(p[label], n, every)
                    gains.append(f"{ctx.diff(merged, raw)[0]:+.4f}" if merged is not None else "-")
                rows.append([seed, label, every, *gains])
    return Experiment("e8-v-and-n", "E8: the spacing V and the number N of merged checkpoints", PAPER,
                      "Early in training a large V or N can be worse than not merging; late in training more "
                      "checkpoints help, with diminishing returns. 'Diminishing returns' holds only when E8c1, E8c2 "
                      "and E8c3 all hold.", setup(ctx) + f" V in {vs} steps, N in {list(N_VALUES)}.", c,
                      ["SMA - raw (half B) by V and N:\n\n" + markdown_table(
                          ["seed", "point", "V", *[f"N={n}" for n in N_VALUES]], rows)], data={"rows": rows})


def _restart_stats(ctx: Context, spec_lists: dict) -> tuple[tuple[float, float], tuple[float, float], list]:
    """(final loss merged - last, pooled over batch orders), (largest training-loss rise merged - last), rows."""
    finals, rises, rows = [], [], []
    for last, merged in zip(spec_lists["last"], spec_lists["merged"]):
        end = last.steps
        d = ctx.diff(ctx.raw(merged.name, end), ctx.raw(last.name, end))
        rise = {}
        for spec in (last, merged):
            losses = [x[1] if math.isfinite(x[1]) else math.log(256) for x in ctx.traj(spec.name).log]
            smooth = np.convolve(losses, np.ones(SPIKE_SMOOTH) / SPIKE_SMOOTH, mode="valid")
            rise[spec] = float(smooth.max() - smooth[0]) if len(smooth) else 0.0
        finals.append(d)
        rises.append(rise[merged] - rise[last])
        rows.append([last.data_seed, f"{d[0]:+.4f} ± {d[1]:.4f}", f"{rise[last]:+.3f}", f"{rise[merged]:+.3f}"])
    final = pooled(finals)[:2] if len(finals) > 1 else finals[0]
    rise_se = float(np.std(rises, ddof=1) / math.sqrt(len(rises))) if len(rises) > 1 else 0.0
    return final, (float(np.mean(rises)), rise_se), rows


def e9(ctx: Context, spiking: dict[int, int]) -> Experiment:
    s = ctx.scale
    c = [Claim("E9a", "restarting from the SMA of the 3 pre-spike checkpoints ends at a lower held-out loss than "
               "restarting from the last one", "less", f"held-out loss {s.restart_steps} steps after the restart, "
               f"merged - last; per seed pooled over {s.batch_orders} batch orders", primary=True),
         Claim("E9b", "the merged restart's training loss rises less", "less",
               "largest rise of the 10-step mean training loss after the restart, merged - last; SE over batch "
               "orders")]
    rows = []
    for seed, spike_step in spiking.items():
        spike = spike_spec(s, ctx.lrs["tuned"], seed)
        specs = restart_specs(s, spike, spike_step)
        final, rise, order_rows = _restart_stats(ctx, specs)
        start = pre_spike(s, spike_step)
        peak = max(t for t in ctx.traj(spike.name).snaps)
        m = SPIKE_MARGIN * abs(ctx.diff(ctx.raw(spike.name, peak), ctx.raw(spike.name, start), "A")[0])
        c[0].add(seed, final, m)
        c[1].add(seed, rise, SPIKE_MARGIN * max(abs(rise[0]), 0.05))
        rows += [[seed, spike_step, start, *r] for r in order_rows]
    return Experiment("e9-spike-recovery", "E9: PMA-init to recover from a loss spike", PAPER,
                      "Resuming a diverging high-LR run from the SMA of the three checkpoints saved before the "
                      "collapse passes the spike point and rejoins the trajectory, where resuming from the last "
                      "checkpoint does not.",
                      f"The spike runs of E4 whose detector fired (seed: spike step {spiking}, of seeds "
                      f"{list(s.spike_seeds)}; constant tuned LR, clipping off, LR x {s.spike_lr_factor:g} for the "
                      f"{s.spike_surge[1]} updates from step {s.spike_surge[0]}). The restarts run through the same "
                      "surge at the same steps. Both restarts start from the last pre-spike "
                      f"snapshot's Adam state; the merged one replaces its weights by the SMA of the 3 pre-spike "
                      f"snapshots. Each continues {s.restart_steps} steps with {s.batch_orders} batch orders (the "
                      "same orders for both). A diverged model's window losses count as ln 256 (uniform).", c,
                      [markdown_table(["seed", "spike step", "restart step", "batch order", "final: merged - last (B)",
                                       "rise, last", "rise, merged"], rows)], data={"rows": rows})
