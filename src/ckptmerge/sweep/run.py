"""Sweep a run: raw checkpoints and merges at points along it, and merged-constant vs annealed.

    ckptmerge sweep runs/demo/stable --data shakespeare-val --data bible
    ckptmerge sweep path/to/hf-run --method sma --method ema:alpha=0.2 --last 3,5,10 --every 500,1000 --at 4000,8000
    ckptmerge sweep RUN --storage postgresql://user@db/ckptmerge --study run7 -o RUN-sweep   # on every worker
    ckptmerge sweep RUN/phema --method phema:sigma_rel=0.03/0.05/0.07/0.10/0.15   # the post-hoc EMA's width

Every evaluation goes through one cached scorer, so a rerun (more points, another method, a new
checkpoint) scores only what it has not seen. Outputs go to ``--output`` (never into the run). With
``--storage``, the evaluations are trials of one Optuna study that any number of workers running the same
command share (``sweep/shared_study.py``); each builds the report from the study's results.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ckptmerge.console import progress_bar
from ckptmerge.errors import ConfigError, import_optional
from ckptmerge.evaluation.evaluator import EvalResult, check_metric, paired_difference
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import discover
from ckptmerge.parallel.world import refuse_ranks
from ckptmerge.search.storage import DEFAULT_HEARTBEAT_S
from ckptmerge.sweep.evaluator import CachedScorer
from ckptmerge.sweep.grid import (
    MergeSpec,
    base_spacing,
    baseline_refs,
    check_methods,
    choose_points,
    expand_methods,
    is_posthoc,
    make_grid,
    parse_sweep_method,
)
from ckptmerge.sweep.shared_study import score_in_study, study_jobs

CACHE_FILE = "evals.jsonl"


@dataclass
class SweepConfig:
    methods: list[str] = field(default_factory=lambda: ["sma", "wma", "ema:alpha=0.2"])  # merging/method_spec.py
    n: list[int] = field(default_factory=lambda: [3, 5, 10])
    every: list[int] = field(default_factory=list)   # V in steps; empty: the save interval and twice it
    at: list[int] = field(default_factory=list)      # evaluation points; empty: ``points`` spread evenly
    points: int = 8
    data: list[str] = field(default_factory=lambda: ["shakespeare-val"])
    n_tokens: int = 16384
    anneal: list[str] = field(default_factory=list)  # anneal branches; empty: runs forked from this one
    objective: str = "loss"                          # rank merges by ``loss`` (nats/token) or ``bits_per_byte``
    storage: str | None = None                       # an Optuna storage URL: workers share the evaluations
    study: str = "ckptmerge-sweep"
    heartbeat_s: float = DEFAULT_HEARTBEAT_S


def sweep(run_dir: str | Path, cfg: SweepConfig, out: str | Path, *, progress: bool = True, log=print,
          settings: EvalSettings | None = None) -> dict:
    """Score the grid, write ``report.json``, ``report.md`` and PNGs into ``out``; return the report dict."""
    refuse_ranks("sweep", "run it as one process (docs/scale.md)")
    check_metric(cfg.objective, "--objective")  # an unknown name was ranked as loss
    import_optional("matplotlib", extra="plots", needed_by="sweep (its report's plots)")
    if cfg.storage:
        import_optional("optuna", extra="search", needed_by="sweep --storage")
    from ckptmerge.sweep.report import write_report

    run_dir, out = Path(run_dir), Path(out)
    _check_out(run_dir, out)
    cfg = replace(cfg, methods=[str(parse_sweep_method(m)) for m in expand_methods(cfg.methods)])  # canonical
    refs = discover(run_dir).checkpoints
    check_methods(cfg.methods, refs, run_dir)
    base = baseline_refs(refs)  # one per step: raw checkpoints, or the narrowest power-EMA profile's snapshots
    every = cfg.every or [base_spacing(base), 2 * base_spacing(base)]
    grid = make_grid(cfg.methods, cfg.n, every)
    points = choose_points(base, cfg.at, cfg.points)
    headline = (MergeSpec(cfg.methods[0], 0, 0) if is_posthoc(cfg.methods[0])
                else MergeSpec(cfg.methods[0], sorted(cfg.n)[len(cfg.n) // 2], every[0]))
    branches = {Path(p).name: discover(p).checkpoints for p in (cfg.anneal or find_forks(run_dir))}
    scorer = CachedScorer(out / CACHE_FILE, n_tokens=cfg.n_tokens, settings=settings)
    log(f"sweep {run_dir}: {len(refs)} checkpoints, {len(points)} points x {len(grid)} merges x "
        f"{len(cfg.data)} data sets; anneal branches: {', '.join(branches) or 'none'}")
    if cfg.storage:
        jobs = study_jobs(sweep_windows(refs, points, grid, branches.values(), headline), cfg.data)
        score_in_study(scorer, jobs, storage=cfg.storage, study_name=cfg.study, heartbeat_s=cfg.heartbeat_s,
                       progress=progress, log=log)
    rows = grid_rows(scorer, refs, points, grid, cfg.data, progress=progress and not cfg.storage)
    anneal = {name: anneal_rows(scorer, refs, branch, headline, cfg.data) for name, branch in branches.items()}
    config = {k: v for k, v in asdict(cfg).items() if k not in ("storage", "heartbeat_s")}  # URLs hold passwords
    report = {"run": str(run_dir), "config": {**config, "every": every}, "headline": asdict(headline),
              "points": points, "rows": rows, "anneal": anneal, "baseline": _baseline_name(refs, base),
              "cache": {"hits": scorer.hits, "scored": scorer.misses}}
    write_report(out, report)
    log(f"{scorer.misses} evaluations scored, {scorer.hits} from the cache; report: {out / 'report.md'}")
    return report


def _baseline_name(refs: Sequence[CheckpointRef], base: Sequence[CheckpointRef]) -> str:
    if len(base) == len(refs):
        return "raw checkpoints"
    return f"power-EMA snapshots of gamma {base[0].ema_gamma:.2f} (the narrowest stored profile; no raw weights)"


def _check_out(run_dir: Path, out: Path) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run in target.parents:
        raise ConfigError(f"--output {out} is inside the run {run_dir}; sweeps never write into a run. "
                          f"Choose another folder, e.g. --output {run_dir.name}-sweep")


def find_forks(run_dir: Path) -> list[Path]:
    """Sibling runs (ckptmerge's ``run.json``) whose ``fork_from`` checkpoint lies in ``run_dir``."""
    forks = []
    for sibling in sorted(run_dir.resolve().parent.iterdir()):
        config = sibling / "run.json"
        if sibling == run_dir.resolve() or not config.is_file():
            continue
        parent = json.loads(config.read_text()).get("fork_from")
        if parent and Path(parent).resolve().parent == run_dir.resolve():
            forks.append(sibling)
    return forks


def _row(label: str, step: int, spec: MergeSpec | None, results: dict[str, EvalResult],
         raw: dict[str, EvalResult]) -> dict:
    return {"recipe": label, "step": step, **(asdict(spec) if spec else {"method": "raw", "n": 1, "every_steps": 0}),
            "loss": {d: r.loss for d, r in results.items()}, "stderr": {d: r.stderr for d, r in results.items()},
            "bits_per_byte": {d: r.bits_per_byte for d, r in results.items()},
            "tokens": {d: r.tokens for d, r in results.items()},
            "vs_raw": {d: list(paired_difference(r, raw[d])) for d, r in results.items()}}


def grid_windows(refs: Sequence[CheckpointRef], points: Sequence[int],
                 grid: Sequence[MergeSpec]) -> list[tuple[int, MergeSpec | None, list[CheckpointRef]]]:
    """(point, recipe or None for raw, checkpoints merged) for every recipe whose window exists at a point."""
    by_step = {r.step: r for r in baseline_refs(refs)}
    jobs = [(t, spec, [by_step[t]] if spec is None else spec.window(refs, t)) for t in points for spec in [None, *grid]]
    return [(t, spec, window) for t, spec, window in jobs if window is not None]


def sweep_windows(refs: Sequence[CheckpointRef], points: Sequence[int], grid: Sequence[MergeSpec],
                  branches, headline: MergeSpec) -> list[tuple[list[CheckpointRef], list[float]]]:
    """Every (checkpoints, weights) the report scores: the grid's, then each anneal branch's."""
    windows = [(w, [1.0] if spec is None else spec.coeffs(w)) for _, spec, w in grid_windows(refs, points, grid)]
    by_step = {r.step: r for r in refs}
    for branch in branches:
        for annealed in branch:
            window = headline.window(refs, annealed.step) if annealed.step in by_step else None
            if window is not None:
                windows += [([by_step[annealed.step]], [1.0]), (window, headline.coeffs(window)), ([annealed], [1.0])]
    return windows


def grid_rows(scorer: CachedScorer, refs: Sequence[CheckpointRef], points: Sequence[int], grid: Sequence[MergeSpec],
              data: Sequence[str], *, progress: bool = True) -> list[dict]:
    """One row per (point, recipe) whose window exists: losses and paired differences against raw."""
    jobs = grid_windows(refs, points, grid)
    bar = progress_bar(len(jobs) * len(data), "sweep", unit="eval", enabled=progress)
    rows, raw = [], {}
    for t, spec, window in jobs:
        if spec is None:  # a new point: keep only the checkpoints its windows use
            scorer.scorer.forget(keep=[r for u, _, w in jobs if u == t for r in w])
        coeffs = [1.0] if spec is None else spec.coeffs(window)
        results = {d: scorer.score(window, coeffs, d) for d in data}
        bar.update(len(data))
        if spec is None:
            raw[t] = results
        rows.append(_row("raw" if spec is None else spec.label, t, spec, results, raw[t]))
    bar.close()
    return rows


def anneal_rows(scorer: CachedScorer, refs: Sequence[CheckpointRef], branch: Sequence[CheckpointRef],
                spec: MergeSpec, data: Sequence[str]) -> list[dict]:
    """At each anneal checkpoint: raw constant, merged constant (``spec``) and annealed, with paired gaps."""
    by_step = {r.step: r for r in refs}
    rows = []
    for annealed in branch:
        window = spec.window(refs, annealed.step) if annealed.step in by_step else None
        if window is None:
            continue
        raw = {d: scorer.raw(by_step[annealed.step], d) for d in data}
        merged = {d: scorer.score(window, spec.coeffs(window), d) for d in data}
        ann = {d: scorer.raw(annealed, d) for d in data}
        rows.append({"step": annealed.step, "lr": annealed.lr,
                     "raw": {d: r.loss for d, r in raw.items()}, "merged": {d: r.loss for d, r in merged.items()},
                     "annealed": {d: r.loss for d, r in ann.items()},
                     "merged_minus_annealed": {d: list(paired_difference(merged[d], ann[d])) for d in data},
                     "annealed_minus_raw": {d: list(paired_difference(ann[d], raw[d])) for d in data},
                     "merged_minus_raw": {d: list(paired_difference(merged[d], raw[d])) for d in data}})
    return rows
