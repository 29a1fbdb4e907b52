"""Run the reproduction experiments and write their reports.

    ckptmerge reproduce all                 # about an hour on 2 CPU cores; reports/ + runs/reproduce/
    ckptmerge reproduce pma --quick         # the structure in a few minutes (CI); numbers not meaningful

Runs are trained once into the work folder and reused; evaluations are cached there by content hash,
so a rerun after an interruption (or of one group) redoes only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

from ckptmerge.errors import ConfigError
from ckptmerge.reproduce.context import Context
from ckptmerge.reproduce.report import Experiment, write_index
from ckptmerge.reproduce.runs import FULL, QUICK

GROUPS = ("lawa", "bo", "pma")


def reproduce(group: str, *, quick: bool = False, work: str | Path | None = None, reports: str | Path | None = None,
              progress: bool = True, log=print) -> list[Experiment]:
    """Run ``group`` (lawa, bo, pma or all) and return its experiments (verdicts in ``exp.claims``)."""
    from ckptmerge.reproduce.bo import run_bo
    from ckptmerge.reproduce.lawa import run_lawa
    from ckptmerge.reproduce.pma import run_pma

    if group not in (*GROUPS, "all"):
        raise ConfigError(f"unknown experiment group {group!r}; choose one of {', '.join(GROUPS)} or all")
    scale = QUICK if quick else FULL
    work = Path(work or ("runs/reproduce-quick" if quick else "runs/reproduce"))
    reports = Path(reports or (work / "reports" if quick else "reports"))
    ctx = Context.create(work, scale, progress=progress, log=log)
    runners = {"lawa": run_lawa, "bo": run_bo, "pma": run_pma}
    done: list[Experiment] = []
    begun = time.monotonic()
    for name in GROUPS if group == "all" else (group,):
        started = time.monotonic()
        log(f"== {name}: experiments in {reports}, runs in {work}")
        for exp in runners[name](ctx, reports):
            done.append(exp)
            log(f"   {exp.title}: " + "; ".join(f"{c.verdict}" for c in exp.claims))
        log(f"== {name} done in {time.monotonic() - started:.0f} s")
    index = write_index(reports, f"ckptmerge reproduce {group}{' --quick' if quick else ''}", time.monotonic() - begun)
    log(f"index of verdicts: {index}")
    return done
