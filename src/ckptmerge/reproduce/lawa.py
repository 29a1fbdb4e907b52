"""LAWA (Sanyal et al., COLM 2024) at small scale: E1 LR sweep, E2 spacing, E3 EMA / SWA baselines, E4 spikes."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.select import select_last
from ckptmerge.reproduce.context import IN_DOMAIN, TOL_NATS, Context
from ckptmerge.reproduce.report import Experiment, line_plot, markdown_table, publish
from ckptmerge.reproduce.runs import lawa_averagers, lawa_run, spike_run
from ckptmerge.reproduce.verdicts import Claim, combine
from ckptmerge.train.trainer import averager_names

PAPER = "Sanyal et al., *Early Weight Averaging meets High Learning Rates for LLM Pre-training*, COLM 2024"
K = 5  # LAWA's latest-k


def averager_labels(ctx: Context) -> dict[str, str]:
    """Folder name of each online average -> its label."""
    nu = 2 * ctx.scale.lawa_save_every
    labels = ["EMA 0.9", "EMA 0.99", "EMA 0.999", "SWA from 0", "SWA from 75%", "LAWA nu=1", "LAWA nu=10",
              f"LAWA nu={nu}"]
    return dict(zip(averager_names(lawa_averagers(ctx.scale)), labels))


def curves(ctx: Context, run_dir: Path) -> dict[str, dict[int, object]]:
    """``{label: {step: EvalResult}}`` for raw, offline LAWA (k=5 at the save interval) and every online average."""
    refs = ctx.checkpoints(run_dir)
    every = ctx.scale.lawa_save_every
    out: dict[str, dict[int, object]] = {"raw": {}, f"LAWA nu={every}": {}}
    for ref in refs:
        out["raw"][ref.step] = ctx.raw(ref)
        if len([r for r in refs if r.step <= ref.step]) >= K:
            out[f"LAWA nu={every}"][ref.step] = ctx.sma(select_last(refs, K, every_steps=every, end_step=ref.step))
        for folder, label in averager_labels(ctx).items():
            if (ref.path / folder / "config.json").is_file():
                out.setdefault(label, {})[ref.step] = ctx.raw(CheckpointRef(ref.path / folder))
    return out


def _mid(steps: list[int], total: int) -> int:
    return min(steps, key=lambda s: abs(s - total / 2))


def _plot_runs(path: Path, ctx: Context, runs: dict[str, dict], labels: list[str], title: str) -> None:
    series = {}
    for run_name, c in runs.items():
        for label in labels:
            if label in c:
                steps = sorted(c[label])
                series[f"{label}, {run_name}"] = (steps, [c[label][s].loss for s in steps])
    line_plot(path, series, title=title, xlabel="step", ylabel=f"held-out loss ({IN_DOMAIN}, nats/byte)")


def run_lawa(ctx: Context, reports: Path) -> list[Experiment]:
    s = ctx.scale
    low, high = s.lawa_lrs
    per_seed = {}
    for seed in s.seeds:
        per_seed[seed] = {lr: curves(ctx, lawa_run(ctx.work, s, lr, seed, ctx.progress)) for lr in (low, high)}
    spikes = {seed: spike_curves(ctx, spike_run(ctx.work, s, seed, ctx.progress)) for seed in s.seeds}
    return [publish(reports, "e1-lawa-vs-raw", lambda f: e1(ctx, per_seed, f)),
            publish(reports, "e2-lawa-spacing", lambda f: e2(ctx, per_seed, f)),
            publish(reports, "e3-ema-swa-baselines", lambda f: e3(ctx, per_seed, f)),
            publish(reports, "e4-spike-smoothing", lambda f: e4(ctx, spikes, f))]


def _setup(ctx: Context) -> str:
    s = ctx.scale
    return (f"`tiny` Llama (0.82M parameters), byte-level Shakespeare, batch 16 x 128 tokens, AdamW (0.9, 0.95), "
            f"wd 0.1, clip 1.0; cosine schedule over {s.lawa_steps} steps (warm-up {s.warmup_steps}, floor 0.1 x peak) "
            f"at a base LR {s.lawa_lrs[0]:g} and a high LR {s.lawa_lrs[1]:g}; seeds {list(s.seeds)}. A checkpoint "
            f"every {s.lawa_save_every} steps; LAWA = uniform average of the latest k=5. Held-out loss on "
            f"shakespeare-val, {s.eval_tokens} tokens, the same windows for every model.")


def e1(ctx: Context, per_seed: dict, folder: Path) -> Experiment:
    s = ctx.scale
    low, high = s.lawa_lrs
    lawa = f"LAWA nu={s.lawa_save_every}"
    claims = [Claim("LAWA beats the raw checkpoint mid-run at the high LR", "less",
                    detail="LAWA - raw at the checkpoint nearest mid-run, high LR"),
              Claim("LAWA beats the raw checkpoint mid-run at the base LR", "less",
                    detail="LAWA - raw at mid-run, base LR"),
              Claim("the gain is larger at the high LR", "less",
                    detail="(LAWA - raw at high LR) - (LAWA - raw at base LR), mid-run; SEs added in quadrature"),
              Claim("the gain shrinks as the LR decays (high LR)", "less",
                    detail="(LAWA - raw at the end) - ... written as gain(mid) - gain(end) < 0, high LR"),
              Claim("LAWA at the high LR is about the raw run at the base LR", "close", tol=TOL_NATS,
                    detail="LAWA(high LR) - raw(base LR) at mid-run, same windows")]
    rows = []
    for seed, runs in per_seed.items():
        steps = sorted(runs[high][lawa])
        mid, end = _mid(steps, s.lawa_steps), steps[-1]
        gain = {lr: {t: ctx.diff(runs[lr][lawa][t], runs[lr]["raw"][t]) for t in (mid, end)} for lr in (low, high)}
        claims[0].per_seed.append(gain[high][mid])
        claims[1].per_seed.append(gain[low][mid])
        claims[2].per_seed.append(combine(gain[high][mid], gain[low][mid]))
        claims[3].per_seed.append(combine(gain[high][mid], gain[high][end]))
        claims[4].per_seed.append(ctx.diff(runs[high][lawa][mid], runs[low]["raw"][mid]))
        for lr in (low, high):
            for t in (mid, end):
                rows.append([seed, f"{lr:g}", t, runs[lr]["raw"][t].loss, runs[lr][lawa][t].loss,
                             f"{gain[lr][t][0]:+.4f} ± {gain[lr][t][1]:.4f}"])
    runs0 = per_seed[min(per_seed)]
    _plot_runs(folder / "lawa_vs_raw.png", ctx, {f"lr {lr:g}": runs0[lr] for lr in (low, high)}, ["raw", lawa],
               f"LAWA (k=5) vs raw, seed {min(per_seed)}")
    return Experiment("e1-lawa-vs-raw", "E1: LAWA vs raw checkpoints across learning rates", PAPER,
                      "Averaging the latest k checkpoints gives lower loss than the raw checkpoint during training; "
                      "the gain is largest at high learning rates and shrinks as the cosine schedule decays; LAWA at "
                      "a high LR tracks a run at a lower LR.", _setup(ctx), claims,
                      [markdown_table(["seed", "LR", "step", "raw", "LAWA", "LAWA - raw"], rows)],
                      ["lawa_vs_raw.png"], data={"rows": rows})


def e2(ctx: Context, per_seed: dict, folder: Path) -> Experiment:
    s = ctx.scale
    high = s.lawa_lrs[1]
    nus = [1, 10, s.lawa_save_every, 2 * s.lawa_save_every]
    claims = [Claim(f"spacing nu={s.lawa_save_every} beats adjacent steps (nu=1)", "less",
                    detail=f"LAWA(nu={s.lawa_save_every}) - LAWA(nu=1), mid-run, high LR"),
              Claim(f"spacing nu={s.lawa_save_every} beats nu=10", "less",
                    detail=f"LAWA(nu={s.lawa_save_every}) - LAWA(nu=10), mid-run, high LR")]
    rows, gains = [], {nu: [] for nu in nus}
    for seed, runs in per_seed.items():
        c = runs[high]
        steps = sorted(set.intersection(*(set(c[f"LAWA nu={nu}"]) for nu in nus)))
        mid = _mid(steps, s.lawa_steps)
        at = {nu: c[f"LAWA nu={nu}"][mid] for nu in nus}
        claims[0].per_seed.append(ctx.diff(at[s.lawa_save_every], at[1]))
        claims[1].per_seed.append(ctx.diff(at[s.lawa_save_every], at[10]))
        for nu in nus:
            d = ctx.diff(at[nu], c["raw"][mid])
            gains[nu].append(d[0])
            rows.append([seed, mid, nu, f"{K * nu / s.lawa_steps:.2f}", at[nu].loss, f"{d[0]:+.4f} ± {d[1]:.4f}"])
    x = [K * nu / s.lawa_steps for nu in nus]
    line_plot(folder / "gain_vs_spacing.png",
              {f"seed {seed}": (x, [gains[nu][i] for nu in nus]) for i, seed in enumerate(per_seed)},
              title=f"LAWA gain over raw vs window span, mid-run, LR {high:g}", xlabel="k * nu / total steps",
              ylabel="LAWA - raw (nats)")
    return Experiment("e2-lawa-spacing", "E2: LAWA spacing ablation", PAPER,
                      "Gains grow when the averaged checkpoints are far apart in steps (up to a point).", _setup(ctx),
                      claims, [markdown_table(["seed", "step", "nu", "k*nu/T", "loss", "LAWA - raw"], rows)],
                      ["gain_vs_spacing.png"],
                      ["nu=1 and nu=10 are online LAWA averagers kept by the trainer; nu equal to the save interval "
                       "is the offline average of saved checkpoints; the largest nu is online again."],
                      data={"rows": rows})


def e3(ctx: Context, per_seed: dict, folder: Path) -> Experiment:
    s = ctx.scale
    base = s.lawa_lrs[0]
    lawa = f"LAWA nu={s.lawa_save_every}"
    claims = [Claim("SWA from step 0 is worse than raw mid-run", "less", detail="raw - SWA(from 0), mid-run"),
              Claim("SWA from step 0 gets worse relative to raw as training goes on", "less",
                    detail="(SWA0 - raw at mid) - (SWA0 - raw at the end)"),
              Claim("SWA over the last 25% gives a small final gain", "less", detail="SWA(from 75%) - raw, last step"),
              Claim("per-step EMA with decay 0.9 is about the raw model", "close", tol=TOL_NATS,
                    detail="EMA(0.9) - raw, mid-run"),
              Claim("LAWA is competitive with or better than the best EMA", "at_most", tol=TOL_NATS,
                    detail="LAWA - min(EMA 0.99, EMA 0.999), mid-run (the better EMA chosen on the same windows)")]
    rows = []
    for seed, runs in per_seed.items():
        c = runs[base]
        steps = sorted(c["SWA from 0"])
        mid, end = _mid(steps, s.lawa_steps), steps[-1]
        swa0 = {t: ctx.diff(c["SWA from 0"][t], c["raw"][t]) for t in (mid, end)}
        claims[0].per_seed.append(ctx.diff(c["raw"][mid], c["SWA from 0"][mid]))
        claims[1].per_seed.append(combine(swa0[mid], swa0[end]))
        claims[2].per_seed.append(ctx.diff(c["SWA from 75%"][end], c["raw"][end]) if end in c.get("SWA from 75%", {})
                                  else (float("nan"), float("nan")))
        claims[3].per_seed.append(ctx.diff(c["EMA 0.9"][mid], c["raw"][mid]))
        best_ema = min((c["EMA 0.99"][mid], c["EMA 0.999"][mid]), key=lambda r: r.loss)
        claims[4].per_seed.append(ctx.diff(c[lawa][mid], best_ema))
        for label in ("raw", lawa, "EMA 0.9", "EMA 0.99", "EMA 0.999", "SWA from 0", "SWA from 75%"):
            for t in (mid, end):
                if t in c.get(label, {}):
                    rows.append([seed, t, label, c[label][t].loss])
    _plot_runs(folder / "baselines.png", ctx, {f"lr {base:g}": per_seed[min(per_seed)][base]},
               ["raw", lawa, "EMA 0.9", "EMA 0.99", "EMA 0.999", "SWA from 0", "SWA from 75%"],
               f"Averaging baselines, seed {min(per_seed)}, LR {base:g}")
    return Experiment("e3-ema-swa-baselines", "E3: EMA and SWA baselines against LAWA", PAPER,
                      "SWA from the start keeps old, poor weights and falls behind the raw run; SWA over the last "
                      "25% gives a small final gain; EMA with a ~10-step horizon (decay 0.9) is about the raw model; "
                      "LAWA is competitive with EMA.", _setup(ctx) + " EMA and SWA are online averagers (per-step EMA; "
                      "SWA updated every 10 steps), evaluated at the checkpoints.", claims,
                      [markdown_table(["seed", "step", "model", "loss"], rows)], ["baselines.png"], data={"rows": rows})


def spike_curves(ctx: Context, run_dir: Path) -> dict[str, dict[int, object]]:
    refs = ctx.checkpoints(run_dir)
    every = ctx.scale.spike_save_every
    out = {"raw": {}, "LAWA": {}}
    for i, ref in enumerate(refs):
        out["raw"][ref.step] = ctx.raw(ref)
        if i + 1 >= K:
            out["LAWA"][ref.step] = ctx.sma(select_last(refs, K, every_steps=every, end_step=ref.step))
    return out


def largest_jump(curve: dict[int, object], start: int) -> float:
    """Largest rise of held-out loss between consecutive checkpoints at or after ``start``."""
    steps = [t for t in sorted(curve) if t >= start]
    return max((curve[b].loss - curve[a].loss for a, b in zip(steps, steps[1:])), default=0.0)


def e4(ctx: Context, spikes: dict, folder: Path) -> Experiment:
    s = ctx.scale
    claim = Claim("the LAWA curve has smaller spikes than the raw curve", "yes",
                  detail="largest rise of held-out loss between consecutive checkpoints, LAWA < raw, counted over "
                         "the steps where both curves exist")
    rows = []
    for seed, c in spikes.items():
        start = min(c["LAWA"])
        raw_jump, lawa_jump = largest_jump(c["raw"], start), largest_jump(c["LAWA"], start)
        claim.per_seed.append(lawa_jump < raw_jump)
        rows.append([seed, raw_jump, lawa_jump])
    c0 = spikes[min(spikes)]
    line_plot(folder / "spike_curves.png", {k: (sorted(v), [v[t].loss for t in sorted(v)]) for k, v in c0.items()},
              title=f"Held-out loss of a spiky run (LR {s.spike_lr:g}) and its LAWA, seed {min(spikes)}",
              xlabel="step", ylabel="held-out loss (nats/byte)")
    return Experiment("e4-spike-smoothing", "E4: averaging smooths loss spikes", PAPER,
                      "Loss spikes present in the raw trajectory are smaller or absent in the averaged trajectory.",
                      f"`tiny` model at a constant LR {s.spike_lr:g} (5x the demo's, enough for grad-norm explosions "
                      f"and loss jumps), {s.spike_steps} steps, a checkpoint every {s.spike_save_every} steps; LAWA = "
                      f"SMA of the latest 5 checkpoints; seeds {list(s.seeds)}.", [claim],
                      [markdown_table(["seed", "largest rise, raw", "largest rise, LAWA"], rows)],
                      ["spike_curves.png"], data={"rows": rows})
