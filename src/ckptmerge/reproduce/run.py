"""Run the reproduction (docs/methods.md) and write its reports.

    ckptmerge reproduce all                  # the full design (~100 min on an idle 2-core machine)
    ckptmerge reproduce all --quick          # same code, fewer steps, 3 seeds (14 min on 2 shared cores)
    ckptmerge reproduce all --seeds 3 4 5 --train-data bible --eval-data bible ...   # another regime

Runs train two at a time into the work folder and are reused; a cut-off reproduction resumes each
run where it stopped. Evaluation is in memory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ckptmerge.errors import ConfigError, import_optional
from ckptmerge.reproduce import design
from ckptmerge.reproduce.context import Context
from ckptmerge.reproduce.report import Experiment, publish, write_index
from ckptmerge.reproduce.scale import EXTREME_WITHIN, GROUPS, HIGH_WITHIN, Scale
from ckptmerge.reproduce.stats import holm, side_by_side
from ckptmerge.reproduce.training import train_many

SETTINGS = "settings.json"


def _check_work(work: Path, scale: Scale) -> None:
    """A work folder holds runs of one scale and settings only; more seeds may join it later.

    The seeds may differ from the folder's (``--seeds 0 1 2 3 4`` after ``0 1 2`` reuses the first three
    seeds' runs: a run's name and settings depend on its own seed only), as long as the first seed, whose
    LR sweep picks the LRs, is the same.
    """
    work.mkdir(parents=True, exist_ok=True)
    path, wanted = work / SETTINGS, json.loads(json.dumps(scale.describe()))
    if path.is_file():
        held = json.loads(path.read_text())
        if {k: v for k, v in held.items() if k != "seeds"} != {k: v for k, v in wanted.items() if k != "seeds"} \
                or held.get("seeds", [None])[0] != wanted["seeds"][0]:
            raise ConfigError(f"{work} holds a reproduction with other settings ({path}; more seeds may be added, but "
                              "the first seed and every other setting must match); use another --work")
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def choose_lrs(ctx: Context) -> dict:
    """Tuned LR = lowest final loss of the sweep (half A); high = the largest within 3%; extreme = the largest."""
    s = ctx.scale
    finals = {}
    for lr in s.sweep_lrs:
        name = design.lawa_spec(s, lr, s.seeds[0]).name
        traj = ctx.traj(name)
        finals[lr] = ctx.mean(ctx.raw(name, s.lawa_steps), "A") if not traj.diverged else math.inf
    tuned = min(finals, key=finals.get)
    within = [lr for lr in finals if lr > tuned and finals[lr] <= (1 + HIGH_WITHIN) * finals[tuned]]
    above = [lr for lr in finals if lr > tuned]
    high = max(within) if within else (min(above) if above else tuned)
    note = (f"the largest within {HIGH_WITHIN:.0%} of the tuned loss" if within else
            f"no larger LR was within {HIGH_WITHIN:.0%}; the next one up" if above else "the tuned LR is the largest")
    top = max(finals)
    extreme = top if (s.extreme_arm and top not in (tuned, high) and finals[top] <= (1 + EXTREME_WITHIN) * finals[tuned]) \
        else None
    roles = {tuned: "tuned", high: "high", extreme: "extreme"}
    return {"tuned": tuned, "high": high, "extreme": extreme, "high_note": note,
            "sweep": [(lr, finals[lr], roles.get(lr, "")) for lr in s.sweep_lrs]}


def train_all(ctx: Context, workers: int, group: str = "all") -> dict[int, int]:
    """The runs ``group`` needs, in dependency order; returns {seed: spike step} of the spike runs that spiked."""
    s, w = ctx.scale, ctx.work
    need = {"lawa": {"lawa", "spike"}, "bo": {"wsd"}, "pma": {"wsd", "spike", "restart"}}
    wanted = set().union(*need.values()) if group == "all" else need[group]
    train_many([design.lawa_spec(s, lr, s.seeds[0]) for lr in s.sweep_lrs], w, workers, ctx.log)
    ctx.lrs = choose_lrs(ctx)
    arms = [ctx.lrs[k] for k in ("tuned", "high", "extreme") if ctx.lrs.get(k)]
    tuned, high = ctx.lrs["tuned"], ctx.lrs["high"]
    first = [design.wsd_spec(s, tuned, seed) for seed in s.seeds] if "wsd" in wanted else []
    first += [design.spike_spec(s, tuned, seed) for seed in s.spike_seeds] if "spike" in wanted else []
    if "lawa" in wanted:
        first += [design.lawa_spec(s, lr, seed) for lr in arms for seed in s.seeds[1:]]
        first += [design.batch4_spec(s, high, seed) for seed in s.seeds]
    train_many(first, w, workers, ctx.log)
    spiking = {}
    for seed in s.spike_seeds if "spike" in wanted else ():
        traj = ctx.traj(design.spike_spec(s, tuned, seed).name)
        if traj.spike_step is not None and design.pre_spike(s, traj.spike_step) - 2 * design.spike_every(s) >= 1 \
                and design.pre_spike(s, traj.spike_step) in traj.states:
            spiking[seed] = traj.spike_step
    later = [design.anneal_spec(s, tuned, seed) for seed in s.seeds] if "wsd" in wanted else []
    for seed, step in spiking.items() if "restart" in wanted else ():
        specs = design.restart_specs(s, design.spike_spec(s, tuned, seed), step)
        later += specs["last"] + specs["merged"]
    train_many(later, w, workers, ctx.log)
    return spiking


def reproduce(group: str, *, scale: Scale, work: str | Path, reports: str | Path, workers: int = 2,
              command: str = "ckptmerge reproduce all", log=print) -> list[Experiment]:
    """Train what is missing, evaluate in memory, publish one report per experiment and the index."""
    for package in ("optuna", "matplotlib"):  # SciPy: reproduce.stats, imported with this module
        import_optional(package, extra="reproduce", needed_by="reproduce")
    from ckptmerge.reproduce import bo, hessian, lawa, pma

    if group not in (*GROUPS, "all"):
        raise ConfigError(f"unknown experiment group {group!r}; choose one of {', '.join(GROUPS)} or all")
    import torch

    torch.set_num_threads(1)  # one core per process: training workers run beside it; no spinning threads under load
    work, reports = Path(work), Path(reports)
    _check_work(work, scale)
    began = time.monotonic()
    ctx = Context.create(work, scale, log=log)
    spiking = train_all(ctx, workers, group)
    log(f"== trained in {time.monotonic() - began:.0f} s; tuned LR {ctx.lrs['tuned']:g}, high {ctx.lrs['high']:g}, "
        f"spike runs that spiked (seed: step) {spiking}")
    builders = {"lawa": [lambda: lawa.e1(ctx), lambda: lawa.e2(ctx), lambda: lawa.e3(ctx)],
                "bo": [lambda: bo.e5(ctx)],
                "pma": [lambda: pma.e6(ctx), lambda: pma.e7(ctx), lambda: pma.e8(ctx)]}
    if len(spiking) >= 3:
        builders["lawa"].append(lambda: lawa.e4(ctx, spiking))
        builders["pma"].append(lambda: pma.e9(ctx, spiking))
    else:
        log(f"   only {len(spiking)} of {len(scale.spike_seeds)} spike seeds spiked: E4 and E9 need 3; not reported")
    builders["pma"].append(lambda: hessian.e11(ctx))
    done = []
    for name in GROUPS if group == "all" else (group,):
        for build in builders[name]:
            exp = build()
            done.append(exp)
            log(f"   {exp.title}: evaluated")
    claims = [c for exp in done for c in exp.claims]
    holm(claims)
    side_by_side(claims)  # with more than 3 seeds: the outcome of the first 3 beside the outcome of all
    settings = {**scale.describe(), "tuned_lr": ctx.lrs["tuned"], "high_lr": ctx.lrs["high"],
                "extreme_lr": ctx.lrs["extreme"], "diverging_spike_seeds": sorted(spiking),
                "spike_surge": list(scale.spike_surge), "spike_step_per_seed": {str(k): v for k, v in spiking.items()}}
    for exp in done:
        publish(reports, exp, settings)
        log(f"   {exp.title}: " + "; ".join(c.result()["outcome"] for c in exp.claims))
    index = write_index(reports, command, settings, time.monotonic() - began)
    log(f"index of outcomes: {index}")
    return done
