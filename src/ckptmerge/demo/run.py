"""The demo: what merging gives a real (tiny) pre-training run, measured on held-out text.

    ckptmerge demo                      # about 7 minutes on 2 CPU cores
    ckptmerge demo --quick              # a smoke version in about a minute

1. Train the ``tiny`` preset at a constant LR (the stable phase of WSD), a checkpoint every V steps.
2. Fork an anneal branch from the stable run and decay the LR to 0 over the last steps (WSD's decay).
3. Merge the last N stable checkpoints with SMA, WMA and EMA (PMA), and SMA windows along the run.
4. Evaluate everything on the same windows of in-domain and other held-out text, write
   ``report.md``, ``report.json`` and ``loss_vs_step.png`` into the output folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.corpora import HELD_OUT
from ckptmerge.data.tokens import load_tokens
from ckptmerge.errors import import_optional
from ckptmerge.io.remote import refuse_urls
from ckptmerge.evaluation.evaluator import EvalResult, evaluate_model, load_model, paired_difference
from ckptmerge.merging.discover import discover
from ckptmerge.merging.offline import merge
from ckptmerge.merging.schedules import compute_coeffs
from ckptmerge.merging.select import select_last
from ckptmerge.train.checkpointing import checkpoint_name
from ckptmerge.train.trainer import TrainConfig, train_or_resume


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    preset: str = "tiny"
    lr: float = 6e-3
    warmup_steps: int = 100
    steps: int = 1400
    save_every: int = 50
    anneal_steps: int = 300
    merge_last: int = 6
    ema_alpha: float = 0.3
    data: str = "shakespeare"
    eval_data: list[str] = field(default_factory=lambda: list(HELD_OUT))
    eval_tokens: int = 32768
    curve_tokens: int = 8192
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        return cls(**{"out": "runs/demo-quick", "steps": 60, "save_every": 5, "anneal_steps": 15, "warmup_steps": 5,
                      "merge_last": 4,
                      "eval_tokens": 4096, "curve_tokens": 2048, **overrides})


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print) -> dict:
    """Run every stage (reusing finished runs in ``cfg.out``) and return the report dict."""
    refuse_urls("demo", "it trains and writes into a local folder", output=cfg.out, train_data=cfg.data,
                data=cfg.eval_data)
    import_optional("matplotlib", extra="plots", needed_by="demo (its loss-vs-step plot)")
    out = Path(cfg.out)
    stable, anneal = out / "stable", out / "anneal"
    base = TrainConfig(preset=cfg.preset, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       save_every=cfg.save_every, data=cfg.data, seed=cfg.seed)
    log(f"== 1/4 stable phase: {cfg.preset}, constant LR {cfg.lr}, {cfg.steps} steps -> {stable}")
    train_or_resume(base, stable, progress=progress)
    fork_step = cfg.steps - cfg.anneal_steps
    log(f"== 2/4 anneal branch: fork at step {fork_step}, LR -> 0 over {cfg.anneal_steps} steps -> {anneal}")
    fork = TrainConfig(**{**asdict(base), "schedule": "wsd", "decay_steps": cfg.anneal_steps,
                          "fork_from": str(stable / checkpoint_name(fork_step))})
    train_or_resume(fork, anneal, progress=progress)
    log(f"== 3/4 merging the last {cfg.merge_last} stable checkpoints (every {cfg.save_every} steps)")
    merged = _merge_final(cfg, stable, out / "merged")
    curve_merges = _merge_along_run(cfg, stable, out / "merged-along-run")
    log(f"== 4/4 evaluating on {', '.join(cfg.eval_data)}")
    report = _evaluate(cfg, stable, anneal, merged, curve_merges)
    _write_report(out, cfg, report)
    return report


def _merge_final(cfg: DemoConfig, stable: Path, folder: Path) -> dict[str, Path]:
    refs = select_last(discover(stable).checkpoints, cfg.merge_last, every_steps=cfg.save_every)
    recipes = {"SMA": ("sma", {}), "WMA": ("wma", {}), f"EMA a={cfg.ema_alpha}": ("ema", {"alpha": cfg.ema_alpha})}
    paths = {}
    for label, (schedule, params) in recipes.items():
        paths[label] = folder / schedule
        recipe = {"schedule": schedule, **params, "last": cfg.merge_last, "every": cfg.save_every}
        merge(refs, compute_coeffs(schedule, refs, **params), paths[label], force=True, progress=False, recipe=recipe)
    return paths


def _merge_along_run(cfg: DemoConfig, stable: Path, folder: Path) -> dict[int, Path]:
    refs = discover(stable).checkpoints
    first_full = refs[0].step + (cfg.merge_last - 1) * cfg.save_every  # earliest end with a full window
    ends = [r.step for r in refs
            if r.step >= max(first_full, cfg.steps // 3) and (r.step // cfg.save_every) % 2 == 0]
    paths = {}
    for end in ends:
        window = select_last(refs, cfg.merge_last, every_steps=cfg.save_every, end_step=end)
        paths[end] = folder / f"sma-{checkpoint_name(end)}"
        merge(window, compute_coeffs("sma", window), paths[end], force=True, progress=False)
    return paths


def _evaluate(cfg: DemoConfig, stable: Path, anneal: Path, merged: dict[str, Path], curve_merges: dict[int, Path]) -> dict:
    context = TrainConfig(preset=cfg.preset).seq_len
    windows = {d: eval_windows(load_tokens(d), n_tokens=cfg.eval_tokens, context=context) for d in cfg.eval_data}
    in_domain = cfg.eval_data[0]
    curve_windows = eval_windows(load_tokens(in_domain), n_tokens=cfg.curve_tokens, context=context)

    def curve(paths: dict[int, Path]) -> list[list[float]]:
        return [[step, evaluate_model(load_model(p), curve_windows).loss] for step, p in sorted(paths.items())]

    rows = {f"last constant-LR (step {cfg.steps})": stable / checkpoint_name(cfg.steps), **merged,
            f"annealed (step {cfg.steps})": anneal / checkpoint_name(cfg.steps)}
    table: dict[str, dict[str, EvalResult]] = {}
    for label, path in rows.items():
        model = load_model(path)
        table[label] = {d: evaluate_model(model, w, data=d) for d, w in windows.items()}
    return {
        "config": asdict(cfg),
        "table": {label: {d: r.to_dict() for d, r in by_data.items()} for label, by_data in table.items()},
        "versus_last": _comparisons(table, labels_of(table)[0]),
        "versus_annealed": _comparisons(table, labels_of(table)[-1]),
        "curves": {
            "stable": curve({r.step: r.path for r in discover(stable).checkpoints}),
            "anneal": curve({r.step: r.path for r in discover(anneal).checkpoints}),
            f"SMA of last {cfg.merge_last}": curve(curve_merges),
        },
        "in_domain": in_domain,
    }


def labels_of(table: dict) -> list[str]:
    return list(table)


def _comparisons(table: dict[str, dict[str, EvalResult]], base_label: str) -> dict:
    """Every other row minus row ``base_label``, per domain: mean difference and its paired standard error."""
    base = table[base_label]
    return {label: {d: dict(zip(("diff", "se"), paired_difference(r, base[d]))) for d, r in by_data.items()}
            for label, by_data in table.items() if label != base_label}


def _write_report(out: Path, cfg: DemoConfig, report: dict) -> None:
    from ckptmerge.demo.report import plot_curves, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(report, out / "loss_vs_step.png")
    (out / "report.md").write_text(render_markdown(report))
