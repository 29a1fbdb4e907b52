"""LAWA (Sanyal et al., COLM 2024): E1 gains vs LR and decay, E2 window span, E3 EMA baselines, E4 spikes."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.reproduce.context import LOSS_MARGIN, SPIKE_MARGIN, Context
from ckptmerge.reproduce.design import (
    batch4_spec,
    ema_decays,
    lawa_points,
    lawa_spans,
    lawa_spec,
    pre_spike,
    spike_every,
    spike_spec,
    window,
)
from ckptmerge.reproduce.report import Experiment, line_plot, markdown_table
from ckptmerge.reproduce.scale import LAWA_K
from ckptmerge.reproduce.stats import Claim, combine

PAPER = "Sanyal et al., *Early Weight Averaging meets High Learning Rates for LLM Pre-training*, COLM 2024"


def setup(ctx: Context) -> str:
    s, lrs = ctx.scale, ctx.lrs
    spans = ", ".join(f"{k} (nu={nu}, {s.span(nu):.1%} of the run)" for k, nu in lawa_spans(s).items())
    return (f"`{s.preset}` model, context {s.context}, batch {s.batch_size}, trained on `{s.train_data}`, AdamW "
            f"(0.9, 0.95), wd 0.1, clip 1.0; {s.schedule} schedule over {s.lawa_steps} steps (warm-up {s.warmup}, "
            f"floor 0.1 x peak). LR sweep (seed {s.seeds[0]}): {', '.join(f'{lr:g}' for lr in s.sweep_lrs)}; tuned "
            f"LR {lrs['tuned']:g}, high LR {lrs['high']:g} ({lrs['high_note']}). Seeds {list(s.seeds)}. LAWA = "
            f"uniform average of the latest k={LAWA_K} checkpoints nu steps apart; window spans: {spans}; the 5% "
            f"span is primary. Held-out loss on `{ctx.in_domain}`, {s.eval_tokens} tokens in windows of "
            f"{s.context}, the same windows for every model.")


class LawaRun:
    """Raw and LAWA losses of one cosine run at its points, with the raw drift across each window."""

    def __init__(self, ctx: Context, lr: float, seed: int):
        self.ctx, self.name = ctx, lawa_spec(ctx.scale, lr, seed).name
        self.points = lawa_points(ctx.scale)

    def raw(self, t: int):
        return self.ctx.raw(self.name, t)

    def lawa(self, t: int, span: str = "5%"):
        nu = lawa_spans(self.ctx.scale)[span]
        return self.ctx.merged(self.name, [x for x in window(t, LAWA_K, nu) if x >= 1])

    def gain(self, t: int, span: str = "5%"):
        return self.ctx.diff(self.lawa(t, span), self.raw(t))

    def drift(self, t: int, span: str = "5%"):
        first = max(1, t - (LAWA_K - 1) * lawa_spans(self.ctx.scale)[span])
        return self.ctx.diff(self.raw(first), self.raw(t))

    def margin(self, t: int) -> float:
        return LOSS_MARGIN * self.ctx.mean(self.raw(t), "A")

    def ema(self, t: int, decay: float):
        return self.ctx.flat(self.ctx.traj(self.name).emas[decay][t], key=(self.name, t, "ema", decay))


def e1(ctx: Context) -> Experiment:
    s, lrs = ctx.scale, ctx.lrs
    mid, end = lawa_points(s)[1], lawa_points(s)[-1]
    c = [Claim("E1a", "LAWA beats the raw checkpoint mid-run at the high LR", "less", "LAWA(5%) - raw, mid-run, "
               "high LR", primary=True),
         Claim("E1b", "LAWA beats the raw checkpoint mid-run at the tuned LR", "less", "LAWA(5%) - raw, mid-run, "
               "tuned LR"),
         Claim("E1c", "the gain is larger at the high LR", "less", "(LAWA - raw at the high LR) - (LAWA - raw at the "
               "tuned LR), mid-run; SEs in quadrature", primary=True),
         Claim("E1d", "the gain shrinks as the LR decays (high LR)", "less", "(LAWA - raw at mid-run) - (LAWA - raw "
               "at the end), high LR; SEs in quadrature", primary=True),
         Claim("E1e", "LAWA at the high LR is about the raw run at the tuned LR", "equivalent",
               "LAWA(5%, high LR) - raw(tuned LR), mid-run, same windows")]
    if lrs.get("extreme"):
        c.append(Claim("E1f", f"extreme arm (LR {lrs['extreme']:g}): LAWA beats raw mid-run", "less",
                       "LAWA(5%) - raw, mid-run, extreme LR"))
    rows, curves = [], {}
    for seed in s.seeds:
        runs = {k: LawaRun(ctx, lrs[k], seed) for k in ("tuned", "high", "extreme") if lrs.get(k)}
        hi, lo = runs["high"], runs["tuned"]
        m = hi.margin(mid)
        c[0].add(seed, hi.gain(mid), m)
        c[1].add(seed, lo.gain(mid), lo.margin(mid))
        c[2].add(seed, combine(hi.gain(mid), lo.gain(mid)), m)
        c[3].add(seed, combine(hi.gain(mid), hi.gain(end)), m)
        c[4].add(seed, ctx.diff(hi.lawa(mid), lo.raw(mid)), m)
        if "extreme" in runs:
            c[5].add(seed, runs["extreme"].gain(mid), runs["extreme"].margin(mid))
        for key, run in runs.items():
            for t in run.points:
                g, d = run.gain(t), run.drift(t)
                rows.append([seed, f"{key} {lrs[key]:g}", t, f"{t / s.lawa_steps:.0%}", ctx.mean(run.raw(t)),
                             ctx.mean(run.lawa(t)), f"{g[0]:+.4f} ± {g[1]:.4f}", f"{d[0]:+.4f}"])
                if seed == s.seeds[0]:
                    for label, value in ((f"raw, {key} LR", ctx.mean(run.raw(t))),
                                         (f"LAWA 5%, {key} LR", ctx.mean(run.lawa(t)))):
                        curves.setdefault(label, ([], []))[0].append(t)
                        curves[label][1].append(value)
    sweep = [[f"{lr:g}", loss, f"{loss / min(x[1] for x in lrs['sweep']) - 1:+.1%}", role]
             for lr, loss, role in lrs["sweep"]]

    def draw(folder: Path) -> None:
        line_plot(folder / "lawa_vs_raw.png", curves, title=f"LAWA (5% span) vs raw, seed {s.seeds[0]}",
                  xlabel="step", ylabel=f"held-out loss ({ctx.in_domain}, nats/byte)")

    return Experiment("e1-lawa-vs-raw", "E1: LAWA vs raw checkpoints across learning rates", PAPER,
                      "Averaging the latest k checkpoints gives lower loss than the raw checkpoint during training; "
                      "the gain is largest at high learning rates and shrinks as the cosine schedule decays; LAWA at "
                      "a high LR tracks a run at a lower LR.", setup(ctx), c,
                      ["LR sweep (final held-out loss, half A, seed 0; the tuned LR has the lowest):\n\n"
                       + markdown_table(["LR", "final loss", "vs tuned", "role"], sweep),
                       "Per seed and point (primary 5% span). *drift* = raw loss at the window's first checkpoint "
                       "minus raw loss at its last (half B): how much the raw run improved across the window.\n\n"
                       + markdown_table(["seed", "LR", "step", "of run", "raw", "LAWA 5%", "LAWA - raw (B)",
                                         "drift across window"], rows)],
                      ["lawa_vs_raw.png"], data={"rows": rows, "sweep": sweep}, draw=draw)


def e2(ctx: Context) -> Experiment:
    s = ctx.scale
    mid = lawa_points(s)[1]
    spans = lawa_spans(s)
    c = [Claim("E2a", "the 5% span beats the 1% span (wider spacing helps)", "less",
               "LAWA(5%) - LAWA(1%), mid-run, high LR"),
         Claim("E2b", "the 20% span beats the 5% span (wider still helps)", "less",
               "LAWA(20%) - LAWA(5%), mid-run, high LR")]
    rows = []
    for seed in s.seeds:
        run = LawaRun(ctx, ctx.lrs["high"], seed)
        m = run.margin(mid)
        c[0].add(seed, ctx.diff(run.lawa(mid, "5%"), run.lawa(mid, "1%")), m)
        c[1].add(seed, ctx.diff(run.lawa(mid, "20%"), run.lawa(mid, "5%")), m)
        for span, nu in spans.items():
            g, d = run.gain(mid, span), run.drift(mid, span)
            rows.append([seed, mid, span, nu, f"{s.span(nu):.2%}", f"{g[0]:+.4f} ± {g[1]:.4f}", f"{d[0]:+.4f}"])
    return Experiment("e2-lawa-spacing", "E2: LAWA window span (spacing) ablation", PAPER,
                      "Gains grow when the averaged checkpoints are far apart in steps (up to a point).", setup(ctx), c,
                      ["Gain and raw drift by span (mid-run, high LR):\n\n" + markdown_table(
                          ["seed", "step", "span", "nu", "span / run", "LAWA - raw (B)", "drift across window"], rows)],
                      data={"rows": rows})


def e3(ctx: Context) -> Experiment:
    s = ctx.scale
    mid = lawa_points(s)[1]
    decays = ema_decays(s)
    matched = decays[-1]
    c = [Claim("E3a", "LAWA beats the best per-step EMA", "less", f"LAWA(5%) - EMA(best of {list(decays)} on half A), "
               "mid-run, high LR", primary=True),
         Claim("E3b", f"LAWA beats the EMA whose half-life equals LAWA's mean lag (decay {matched:g})", "less",
               "LAWA(5%) - EMA(matched), mid-run, high LR"),
         Claim("E3c", "per-step EMA 0.9 is about the raw model", "equivalent", "EMA(0.9) - raw, mid-run, high LR"),
         Claim("E3d", "per-step EMA 0.9 is about the raw model at batch x4", "equivalent",
               "EMA(0.9) - raw at the middle of the batch x4 arm (1/4 of the steps, equal tokens), high LR")]
    rows = []
    for seed in s.seeds:
        run = LawaRun(ctx, ctx.lrs["high"], seed)
        m = run.margin(mid)
        emas = {d: run.ema(mid, d) for d in decays}
        best = min(decays, key=lambda d: ctx.mean(emas[d], "A"))
        c[0].add(seed, ctx.diff(run.lawa(mid), emas[best]), m)
        c[1].add(seed, ctx.diff(run.lawa(mid), emas[matched]), m)
        c[2].add(seed, ctx.diff(emas[0.9], run.raw(mid)), m)
        b4 = batch4_spec(s, ctx.lrs["high"], seed)
        t4 = b4.snap_steps[0]
        raw4 = ctx.raw(b4.name, t4)
        ema4 = ctx.flat(ctx.traj(b4.name).emas[0.9][t4], key=(b4.name, t4, "ema", 0.9))
        c[3].add(seed, ctx.diff(ema4, raw4), LOSS_MARGIN * ctx.mean(raw4, "A"))
        rows.append([seed, ctx.mean(run.raw(mid)), ctx.mean(run.lawa(mid)),
                     *[ctx.mean(emas[d]) for d in decays], f"{best:g}"])
    return Experiment("e3-ema-baselines", "E3: LAWA against per-step EMA baselines", PAPER,
                      "LAWA is competitive with or better than an EMA of the weights; the EMA with decay 0.9 used "
                      "as the official code's baseline (a ~10-step horizon) is about the raw model.",
                      setup(ctx) + f" EMAs are updated after every step from step 0 with decays {list(decays)} (the "
                      f"last one's half-life equals LAWA's mean lag). The batch x4 arm trains at 4x the batch for 1/4 "
                      "of the steps at the high LR.", c,
                      ["Held-out loss at mid-run (half B), high LR:\n\n" + markdown_table(
                          ["seed", "raw", "LAWA 5%", *[f"EMA {d:g}" for d in decays], "best EMA (half A)"], rows)],
                      data={"rows": rows})


def _rise(ctx: Context, series, start: int, steps: list[int]):
    """(peak - start) on half B, the peak chosen on half A: the size of the bump over ``steps``."""
    peak = max(steps, key=lambda t: ctx.mean(series(t), "A"))
    return ctx.diff(series(peak), series(start)), ctx.diff(series(peak), series(start), "A")[0]


def e4(ctx: Context, spiking: dict[int, int]) -> Experiment:
    s = ctx.scale
    every = spike_every(s)
    c = [Claim("E4a", "LAWA shrinks a real loss spike more than it smooths a stable stretch", "less",
               "(rise of LAWA - rise of raw) over the spike minus the same over an equally long stretch before it "
               "(the null); rise = peak (chosen on half A) minus the last pre-spike checkpoint", primary=True),
         Claim("E4b", "null: on a stable stretch LAWA's smoothing is about zero", "equivalent",
               "(rise of LAWA - rise of raw) over a stable stretch of the same run before the spike")]
    rows = []
    for seed, spike_step in spiking.items():
        name = spike_spec(s, ctx.lrs["tuned"], seed).name
        snaps = sorted(ctx.traj(name).snaps)
        start = pre_spike(s, spike_step)
        after = [t for t in snaps if start < t <= start + 10 * every]
        null_start = max(LAWA_K * every, start - 10 * every)
        before = [t for t in snaps if null_start < t <= start] or [start]
        raw = lambda t, n=name: ctx.raw(n, t)  # noqa: E731
        lawa = lambda t, n=name: ctx.merged(n, [x for x in window(t, LAWA_K, every) if x >= every])  # noqa: E731
        rise_raw, raw_a = _rise(ctx, raw, start, after)
        rise_lawa, _ = _rise(ctx, lawa, start, after)
        null_raw, _ = _rise(ctx, raw, null_start, before)
        null_lawa, _ = _rise(ctx, lawa, null_start, before)
        reduction, null = combine(rise_lawa, rise_raw), combine(null_lawa, null_raw)
        m = SPIKE_MARGIN * abs(raw_a)
        c[0].add(seed, combine(reduction, null), m)
        c[1].add(seed, null, m)
        rows.append([seed, spike_step, start, f"{rise_raw[0]:+.4f}", f"{rise_lawa[0]:+.4f}", f"{null[0]:+.4f}"])
    return Experiment("e4-spike-smoothing", "E4: averaging smooths loss spikes", PAPER,
                      "Loss spikes present in the raw trajectory are smaller or absent in the averaged trajectory.",
                      f"Spike runs: `{s.preset}`, constant tuned LR {ctx.lrs['tuned']:g} (warm-up "
                      f"{spike_spec(s, 1.0, 0).warmup} steps), clipping off, and an LR surge to {s.spike_lr_factor:g} x "
                      f"the tuned LR for the {s.spike_surge[1]} updates from step {s.spike_surge[0]} (docs/methods.md, "
                      f"spike design); a snapshot every {every} steps, batch {s.batch_size}. Spike detector (fixed in "
                      "advance): 10-step mean training loss 0.5 nats above its running minimum (or non-finite). Seeds "
                      f"tried {list(s.spike_seeds)}; spiked (counted; seed: detector step): {spiking}. LAWA = SMA of "
                      "the latest 5 "
                      f"snapshots. The rise is measured over 10 snapshots after the last pre-spike one; the null over "
                      "the 10 snapshots before it.", c,
                      [markdown_table(["seed", "spike step (detector)", "last pre-spike snapshot", "raw rise (B)",
                                       "LAWA rise (B)", "null: LAWA - raw rise before the spike"], rows)],
                      notes=[f"{len(spiking)} of {len(s.spike_seeds)} seeds spiked; only those count."],
                      data={"rows": rows, "spiking": spiking})
