"""PMA (Li et al., 2025) at small scale: E6 merge vs anneal, E7 weightings, E8 V and N, E9 spike recovery, E10 PMA-init."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from ckptmerge.errors import SelectionError
from ckptmerge.merging.offline import merge
from ckptmerge.recovery.recover import RecoverConfig, recover
from ckptmerge.recovery.spikes import detect_spikes, read_log
from ckptmerge.reproduce.context import IN_DOMAIN, TOL_NATS, Context
from ckptmerge.reproduce.report import Experiment, line_plot, markdown_table, publish
from ckptmerge.reproduce.runs import spike_run, wsd_run
from ckptmerge.reproduce.verdicts import Claim, combine
from ckptmerge.sweep.grid import MergeSpec, make_grid
from ckptmerge.sweep.report import plot_gain_grid
from ckptmerge.sweep.run import anneal_rows, grid_rows
from ckptmerge.train.checkpointing import checkpoint_name
from ckptmerge.train.config import config_from_dict
from ckptmerge.train.trainer import METRICS, RUN_CONFIG, train_or_resume

PAPER = "Li et al., *Model Merging in Pre-training of Large Language Models* (PMA), 2025"
N_DEFAULT = 10


def run_pma(ctx: Context, reports: Path) -> list[Experiment]:
    return [publish(reports, "e6-pma-vs-anneal", lambda f: e6(ctx, f)),
            publish(reports, "e7-weighting-schemes", lambda f: e7(ctx, f)),
            publish(reports, "e8-v-and-n", lambda f: e8(ctx, f)),
            publish(reports, "e9-spike-recovery", lambda f: e9(ctx, f)),
            publish(reports, "e10-pma-init-continued-training", lambda f: e10(ctx, f))]


def _setup(ctx: Context) -> str:
    s = ctx.scale
    return (f"`tiny` Llama (0.82M parameters), byte-level Shakespeare, batch 16 x 128, AdamW (0.9, 0.95), wd 0.1, "
            f"clip 1.0. WSD: warm-up {s.warmup_steps} steps, constant LR {s.wsd_lr:g} to step {s.wsd_steps}, a "
            f"checkpoint every V = {s.wsd_save_every} steps; an anneal branch forked at step "
            f"{s.wsd_steps - s.anneal_steps} decays the LR linearly to 0 by step {s.wsd_steps}. Seeds {list(s.seeds)}. "
            f"Held-out loss on {IN_DOMAIN}, {s.eval_tokens} tokens, the same windows for every model.")


def _spec(ctx: Context, method: str = "sma", n: int = N_DEFAULT, every: int | None = None) -> MergeSpec:
    return MergeSpec(method, n, every or ctx.scale.wsd_save_every)


def _merged(ctx: Context, refs, spec: MergeSpec, step: int):
    window = spec.window(refs, step)
    if window is None:
        raise SelectionError(f"{spec.label} has no window at step {step}")
    return ctx.score(window, spec.coeffs(window))


def e6(ctx: Context, folder: Path) -> Experiment:
    s = ctx.scale
    fork, end = s.wsd_steps - s.anneal_steps, s.wsd_steps
    claims = [Claim("the merged constant-LR model beats the raw constant-LR checkpoint", "less",
                    detail=f"SMA(N={N_DEFAULT}) - raw, constant branch, step {end}"),
              Claim("early in the decay window the merge beats the partially annealed model", "less",
                    detail="SMA(N=10) of the constant branch - annealed, at the first anneal checkpoint past 20% "
                           "of the decay"),
              Claim("at the end of the decay the merge is comparable to the annealed model", "close", tol=TOL_NATS,
                    detail=f"SMA(N=10) of the constant branch - annealed, step {end}"),
              Claim("merging early-anneal checkpoints is comparable to the end of the anneal", "close", tol=TOL_NATS,
                    detail="SMA(N=3) of the first anneal checkpoints past a third of the decay - annealed final"),
              Claim("merging checkpoints deep in the anneal gives about no gain", "close", tol=TOL_NATS,
                    detail="SMA(N=3) of the last anneal checkpoints - annealed final")]
    rows, plot = [], {}
    for seed in s.seeds:
        stable, anneal = wsd_run(ctx.work, s, seed, ctx.progress)
        refs_c, refs_a = ctx.checkpoints(stable), ctx.checkpoints(anneal)
        by_c, by_a = {r.step: r for r in refs_c}, {r.step: r for r in refs_a}
        spec = _spec(ctx)
        early = min(t for t in by_a if t >= fork + 0.2 * s.anneal_steps)
        anneal_spec = _spec(ctx, n=3)
        third = min(t for t in by_a if t >= fork + s.anneal_steps / 3 and anneal_spec.window(refs_a, t))
        merged_end, raw_end = _merged(ctx, refs_c, spec, end), ctx.raw(by_c[end])
        annealed_end = ctx.raw(by_a[end])
        claims[0].per_seed.append(ctx.diff(merged_end, raw_end))
        claims[1].per_seed.append(ctx.diff(_merged(ctx, refs_c, spec, early), ctx.raw(by_a[early])))
        claims[2].per_seed.append(ctx.diff(merged_end, annealed_end))
        claims[3].per_seed.append(ctx.diff(_merged(ctx, refs_a, anneal_spec, third), annealed_end))
        claims[4].per_seed.append(ctx.diff(_merged(ctx, refs_a, anneal_spec, end), annealed_end))
        for r in anneal_rows(ctx.scorer, refs_c, refs_a, spec, [IN_DOMAIN]):
            gap = r["merged_minus_annealed"][IN_DOMAIN]
            rows.append([seed, r["step"], f"{r['lr'] or 0:.1e}", r["raw"][IN_DOMAIN], r["merged"][IN_DOMAIN],
                         r["annealed"][IN_DOMAIN], f"{gap[0]:+.4f} ± {gap[1]:.4f}"])
            if seed == s.seeds[0]:
                for key, label in (("raw", "raw constant LR"), ("merged", f"SMA N={N_DEFAULT} of constant LR"),
                                   ("annealed", "anneal branch")):
                    plot.setdefault(label, ([], []))
                    plot[label][0].append(r["step"])
                    plot[label][1].append(r[key][IN_DOMAIN])
    line_plot(folder / "merge_vs_anneal.png", plot, title=f"Annealing prediction, seed {s.seeds[0]}",
              xlabel="step (equal tokens)", ylabel=f"held-out loss ({IN_DOMAIN})")
    return Experiment("e6-pma-vs-anneal", "E6: merging constant-LR checkpoints vs annealing (WSD)", PAPER,
                      "Merging checkpoints of the constant-LR phase gives a model that beats the raw checkpoint and "
                      "matches or beats an annealed model at the same token count (better early in the decay window, "
                      "comparable at its end); merging early-anneal checkpoints is comparable to the end of the "
                      "anneal, while merging annealed checkpoints gains little.", _setup(ctx), claims,
                      [markdown_table(["seed", "step", "anneal LR", "raw constant", "SMA N=10 constant", "annealed",
                                       "merged - annealed"], rows)], ["merge_vs_anneal.png"], data={"rows": rows})


def e7(ctx: Context, folder: Path) -> Experiment:
    s = ctx.scale
    early, late = s.early_step, s.wsd_steps
    methods = ["sma", "wma", "ema:0.1", "ema:0.2"]
    claims = [Claim("early: WMA beats SMA", "less", detail=f"WMA - SMA, N={N_DEFAULT}, step {early}"),
              Claim("early: EMA alpha 0.2 beats EMA alpha 0.1", "less", detail=f"EMA(0.2) - EMA(0.1), step {early}"),
              Claim("early: every method beats the raw checkpoint", "less",
                    detail=f"the worst method - raw, step {early}"),
              Claim("late: the methods are about equal", "close", tol=TOL_NATS,
                    detail=f"best - worst method, step {late}")]
    rows, plot = [], {}
    for seed in s.seeds:
        stable, _ = wsd_run(ctx.work, s, seed, ctx.progress)
        refs = ctx.checkpoints(stable)
        by_step = {r.step: r for r in refs}
        at = {t: {m: _merged(ctx, refs, _spec(ctx, m), t) for m in methods} for t in (early, late)}
        raw = {t: ctx.raw(by_step[t]) for t in (early, late)}
        claims[0].per_seed.append(ctx.diff(at[early]["wma"], at[early]["sma"]))
        claims[1].per_seed.append(ctx.diff(at[early]["ema:0.2"], at[early]["ema:0.1"]))
        claims[2].per_seed.append(ctx.diff(max(at[early].values(), key=lambda r: r.loss), raw[early]))
        claims[3].per_seed.append(ctx.diff(max(at[late].values(), key=lambda r: r.loss),
                                           min(at[late].values(), key=lambda r: r.loss)))
        for t in (early, late):
            for m in methods:
                d = ctx.diff(at[t][m], raw[t])
                rows.append([seed, t, m, at[t][m].loss, f"{d[0]:+.4f} ± {d[1]:.4f}"])
                plot.setdefault(f"seed {seed}, step {t}", ([], []))
                plot[f"seed {seed}, step {t}"][0].append(methods.index(m))
                plot[f"seed {seed}, step {t}"][1].append(d[0])
    line_plot(folder / "methods.png", plot, title="Gain over the raw checkpoint by method (x: sma, wma, ema 0.1, "
              "ema 0.2)", xlabel="method index", ylabel="merge - raw (nats)")
    return Experiment("e7-weighting-schemes", "E7: SMA, WMA and EMA weightings early and late", PAPER,
                      "Early in training WMA is best and EMA(0.2) beats EMA(0.1) (more weight on recent "
                      "checkpoints helps when weights move fast); all beat the raw model; late in training the "
                      "differences vanish.", _setup(ctx) + f" N = {N_DEFAULT}, V = {s.wsd_save_every} steps; early "
                      f"point step {early}, late point step {late}.", claims,
                      [markdown_table(["seed", "step", "method", "loss", "merge - raw"], rows)], ["methods.png"],
                      data={"rows": rows})


def e8(ctx: Context, folder: Path) -> Experiment:
    s = ctx.scale
    early, late, v = s.early_step, s.wsd_steps, s.wsd_save_every
    ns, vs = [3, 6, 10, 15], [v, 2 * v, 4 * v]
    claims = [Claim("early: the widest window is worse than no merge", "less",
                    detail=f"raw - SMA over the largest feasible N x V, step {early}"),
              Claim("late: more checkpoints help (N=15 beats N=3)", "less", detail=f"SMA N=15 - SMA N=3, V={v}, step {late}"),
              Claim("late: with diminishing returns", "less",
                    detail="(L(N=6) - L(N=3)) - (L(N=15) - L(N=10)) at V, step late")]
    rows_all = []
    for seed in s.seeds:
        stable, _ = wsd_run(ctx.work, s, seed, ctx.progress)
        refs = ctx.checkpoints(stable)
        rows = grid_rows(ctx.scorer, refs, [early, late], make_grid(["sma"], ns, vs), [IN_DOMAIN], progress=False)
        widest = max((r for r in rows if r["step"] == early and r["recipe"] != "raw"),
                     key=lambda r: (r["n"] * r["every_steps"], r["n"]))
        d, se = widest["vs_raw"][IN_DOMAIN]
        claims[0].per_seed.append((-d, se))
        at = {n: _merged(ctx, refs, _spec(ctx, n=n), late) for n in ns}
        claims[1].per_seed.append(ctx.diff(at[15], at[3]))
        claims[2].per_seed.append(combine(ctx.diff(at[6], at[3]), ctx.diff(at[15], at[10])))
        rows_all += [{**r, "seed": seed} for r in rows]
        plot_gain_grid({"config": {"data": [IN_DOMAIN], "methods": ["sma"], "n": ns, "every": vs},
                        "points": [early, late], "rows": rows}, folder / f"gain_n_v_seed{seed}.png")
    table = [[r["seed"], r["step"], r["n"], r["every_steps"], r["loss"][IN_DOMAIN],
              f"{r['vs_raw'][IN_DOMAIN][0]:+.4f} ± {r['vs_raw'][IN_DOMAIN][1]:.4f}"]
             for r in rows_all if r["recipe"] != "raw"]
    return Experiment("e8-v-and-n", "E8: the spacing V and the number N of merged checkpoints", PAPER,
                      "Early in training, a large V or N can be worse than not merging (it pulls in unstable early "
                      "weights); late in training, more checkpoints help, with diminishing returns.",
                      _setup(ctx) + f" SMA over N in {ns} checkpoints spaced V in {vs} steps, at step {early} and "
                      f"step {late}.", claims, [markdown_table(["seed", "step", "N", "V", "loss", "SMA - raw"], table)],
                      [f"gain_n_v_seed{seed}.png" for seed in s.seeds],
                      ["Not tested: the paper's claim that the best V grows with model size (one width here)."],
                      data={"rows": rows_all})


def e9(ctx: Context, folder: Path) -> Experiment:
    s = ctx.scale
    claims = [Claim("restarting from the SMA of 3 pre-spike checkpoints spikes less than from the last one "
                    "(optimizer state kept)", "yes", detail="spike events after the restart point, merged < last"),
              Claim("the merged restart ends at a lower held-out loss (optimizer state kept)", "less",
                    detail="held-out loss at the end of the restart window, merged restart - last-checkpoint restart"),
              Claim("the merged restart ends at a lower held-out loss (optimizer state reset)", "less",
                    detail="as above, with Adam's moments reset at the restart")]
    rows, notes, plot = [], [], {}
    for seed in s.seeds:
        run_dir = spike_run(ctx.work, s, seed, ctx.progress)
        base = RecoverConfig(n=3, baseline=True, window=min(50, s.spike_steps // 4))
        found = detect_spikes(read_log(run_dir / METRICS), window=base.window, loss_jump=base.loss_jump,
                              grad_factor=base.grad_factor, after_step=3 * s.spike_save_every)
        spike_step = found[0].step if found else int(0.7 * s.spike_steps)
        notes.append(f"seed {seed}: " + (f"first spike at step {spike_step}: {found[0].reason}" if found else
                                         f"no spike detected; restarted at step {spike_step} instead"))
        last_before = max(t for t in range(0, spike_step, s.spike_save_every) if t > 0)
        for policy in ("keep", "reset"):
            cfg = replace(base, spike_step=spike_step, optimizer_state=policy, steps=last_before + s.restart_steps)
            result = recover(run_dir, cfg, ctx.work / f"recover-{policy}-seed{seed}", progress=ctx.progress,
                             log=ctx.log)
            end = {name: ctx.raw(Path(path) / checkpoint_name(cfg.steps)) for name, path in result.runs.items()}
            spikes = {name: len(v) for name, v in result.spikes_after.items()}
            d = ctx.diff(end["restart-merged"], end["restart-last"])
            if policy == "keep":
                claims[0].per_seed.append(spikes["restart-merged"] < spikes["restart-last"])
                claims[1].per_seed.append(d)
            else:
                claims[2].per_seed.append(d)
            rows.append([seed, spike_step, policy, spikes["restart-last"], spikes["restart-merged"],
                         end["restart-last"].loss, end["restart-merged"].loss, f"{d[0]:+.4f} ± {d[1]:.4f}"])
            if seed == s.seeds[0] and policy == "keep":
                plot["original run"] = _log_curve(read_log(run_dir / METRICS), "grad_norm", last_before - 50)
                for name, path in result.runs.items():
                    plot[name] = _log_curve(read_log(Path(path) / METRICS), "grad_norm", last_before - 50)
    line_plot(folder / "grad_norm.png", plot, title=f"Gradient norm around the spike, seed {s.seeds[0]}, Adam state "
              "kept", xlabel="step", ylabel="grad norm (before clipping)")
    return Experiment("e9-spike-recovery", "E9: PMA-init to recover from a loss spike", PAPER,
                      "Resuming an unstable high-LR run from the SMA of the three checkpoints saved before the spike "
                      "passes the spike point and rejoins the trajectory, where resuming from the last checkpoint "
                      "does not (optimizer-state handling is not specified).",
                      f"The spiky `tiny` runs of E4 (constant LR {s.spike_lr:g}, a checkpoint every "
                      f"{s.spike_save_every} steps, every step logged). `ckptmerge recover` finds the first spike "
                      f"(loss 0.3 nats above the trailing median or grad norm 10x its median), merges the last 3 "
                      f"checkpoints before it, and restarts for {s.restart_steps} steps at the same LR from (a) the "
                      "last pre-spike checkpoint and (b) the merge, with Adam's state kept or reset. Both restarts "
                      "see the same batches.", claims,
                      [markdown_table(["seed", "spike step", "optimizer", "spikes after, last", "spikes after, merged",
                                       "final loss, last", "final loss, merged", "merged - last"], rows)],
                      ["grad_norm.png"], notes + [
                          "Our spikes are recoverable ones (the raw run goes on training); the paper's was an "
                          "irrecoverable divergence of a 330M MoE, which a 0.8M model at these LRs does not show."],
                      data={"rows": rows})


def _log_curve(records: list[dict], key: str, start: int) -> tuple[list, list]:
    kept = [r for r in records if r["step"] >= start and key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def e10(ctx: Context, folder: Path) -> Experiment:
    s = ctx.scale
    early_steps = max(2, s.ct_steps // 10)
    claims = [Claim("continued training from the merge starts at a lower loss", "less",
                    detail=f"training loss, merged init - raw init, paired by step over the first {early_steps} steps "
                           "(same batches); SE over steps"),
              Claim("with a smoother gradient norm early on", "yes",
                    detail=f"standard deviation of the grad norm over the first {max(4, s.ct_steps // 5)} steps, "
                           "merged < raw"),
              Claim("and ends at parity", "close", tol=TOL_NATS,
                    detail="held-out loss at the end of continued training, merged init - raw init")]
    rows, plot = [], {}
    for seed in s.seeds:
        stable, _ = wsd_run(ctx.work, s, seed, ctx.progress)
        refs = ctx.checkpoints(stable)
        spec = _spec(ctx)
        window = spec.window(refs, s.wsd_steps)
        merged = ctx.work / f"ct-merged-seed{seed}"
        if not (merged / "merge.json").is_file():
            merge(window, spec.coeffs(window), merged, force=True, progress=False, recipe={"schedule": "sma"})
        original = config_from_dict(json.loads((stable / RUN_CONFIG).read_text()), str(stable))
        ct = replace(original, steps=s.wsd_steps + s.ct_steps, lr=s.ct_lr, schedule="wsd", decay_steps=s.ct_steps,
                     log_every=1, save_every=s.ct_steps, fork_from=str(stable / checkpoint_name(s.wsd_steps)))
        runs = {"raw init": train_or_resume(ct, ctx.work / f"ct-raw-seed{seed}", progress=ctx.progress),
                "merged init": train_or_resume(replace(ct, init_from=str(merged)), ctx.work / f"ct-merged-run-seed{seed}",
                                               progress=ctx.progress)}
        logs = {k: read_log(v / METRICS) for k, v in runs.items()}
        diffs = [m["loss"] - r["loss"] for m, r in zip(logs["merged init"][:early_steps], logs["raw init"][:early_steps])]
        claims[0].per_seed.append((statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5))
        spread = {k: statistics.stdev(r["grad_norm"] for r in v[:max(4, s.ct_steps // 5)]) for k, v in logs.items()}
        claims[1].per_seed.append(spread["merged init"] < spread["raw init"])
        end = {k: ctx.raw(v / checkpoint_name(s.wsd_steps + s.ct_steps)) for k, v in runs.items()}
        d = ctx.diff(end["merged init"], end["raw init"])
        claims[2].per_seed.append(d)
        rows.append([seed, f"{statistics.mean(diffs):+.4f}", f"{spread['raw init']:.3f}", f"{spread['merged init']:.3f}",
                     end["raw init"].loss, end["merged init"].loss, f"{d[0]:+.4f} ± {d[1]:.4f}"])
        if seed == s.seeds[0]:
            for k, v in logs.items():
                plot[k] = _log_curve(v, "loss", 0)
    line_plot(folder / "ct_loss.png", plot, title=f"Continued training from raw vs merged init, seed {s.seeds[0]}",
              xlabel="step", ylabel="training loss (nats/byte)")
    return Experiment("e10-pma-init-continued-training", "E10: PMA-init for continued training", PAPER,
                      "Initializing continued training from a merge gives a lower loss at the start and a smoother "
                      "grad norm, and converges to the same loss later.",
                      _setup(ctx) + f" From step {s.wsd_steps}, continued training for {s.ct_steps} steps with a new "
                      f"schedule (LR {s.ct_lr:g} decaying linearly to 0), Adam state kept from step {s.wsd_steps}, "
                      f"from (a) the raw checkpoint and (b) SMA(N={N_DEFAULT}, V={s.wsd_save_every}) ending there. "
                      "Both see the same batches.", claims,
                      [markdown_table(["seed", "first-steps loss, merged - raw", "grad-norm SD, raw",
                                       "grad-norm SD, merged", "final loss, raw", "final loss, merged",
                                       "merged - raw"], rows)], ["ct_loss.png"], data={"rows": rows})
