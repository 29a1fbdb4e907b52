"""The sweep's report: ``report.json`` (every number), ``report.md`` and four PNGs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ckptmerge.evaluation.evaluator import verdict
from ckptmerge.io.publish import temp_name
from ckptmerge.sweep.grid import MergeSpec, is_posthoc


def write_report(out: Path, report: dict) -> None:
    """Render every file in a temporary folder, then rename each into ``out`` (the cache there is kept)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / temp_name("report")  # owner-named: a killed sweep's leftovers are removed by `ckptmerge clean`
    tmp.mkdir()
    try:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_loss_vs_step(report, tmp / "loss_vs_step.png")
        plot_gain_grid(report, tmp / "gain_n_v.png")
        plot_methods(report, tmp / "methods.png")
        if any(report["anneal"].values()):
            plot_anneal(report, tmp / "anneal_prediction.png")
        (tmp / "report.md").write_text(render_markdown(report))
        for file in tmp.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main_data(report: dict) -> str:
    return report["config"]["data"][0]


def _headline_label(report: dict) -> str:
    h = report["headline"]
    return MergeSpec(h["method"], h["n"], h["every_steps"]).label


UNITS = {"loss": "nats per token", "bits_per_byte": "bits per byte"}


def _value(row: dict, d: str, metric: str) -> float:
    """``row``'s loss on ``d`` in ``metric`` (bits per byte: nats/token x tokens / (bytes x ln 2))."""
    return row["loss"][d] * _scale(row, d, metric)


def _scale(row: dict, d: str, metric: str) -> float:
    if metric != "bits_per_byte":
        return 1.0
    bpb = (row.get("bits_per_byte") or {}).get(d)
    if bpb is None:
        raise ValueError(f"no bits per byte for {d}: its tokens have no tokenizer to count bytes; rank by loss")
    return bpb / row["loss"][d]


def render_markdown(report: dict) -> str:
    d, rows = _main_data(report), report["rows"]
    cfg = report["config"]
    metric = cfg.get("objective", cfg.get("metric", "loss"))  # reports written before the rename say metric
    lines = [f"# What merging gives `{report['run']}`", "",
             f"Held-out loss on **{d}** in {UNITS[metric]} (lower is better). Merges: {', '.join(cfg['methods'])} "
             f"over the last N = {cfg['n']} checkpoints spaced V = {cfg['every']} steps. Gains are paired "
             "differences against the raw checkpoint at the same step (same windows), ± their standard error; "
             "a gain counts when it exceeds 2 SE.", "",
             f"{report['cache']['scored']} evaluations scored, {report['cache']['hits']} read from the cache.", "",
             *([f"The baseline (`raw`) is {report['baseline']}.", ""]
               if report.get("baseline", "raw checkpoints") != "raw checkpoints" else []),
             "| step | raw | best merge | its gain | headline " + _headline_label(report) + " |",
             "|---|---|---|---|---|"]
    for t in report["points"]:
        at = [r for r in rows if r["step"] == t]
        raw = next(r for r in at if r["recipe"] == "raw")
        merges = [r for r in at if r["recipe"] != "raw"]
        head = next((r for r in merges if r["recipe"] == _headline_label(report)), None)
        if not merges:
            lines.append(f"| {t} | {_value(raw, d, metric):.4f} | (no full window yet) | | |")
            continue
        best = min(merges, key=lambda r: _value(r, d, metric))
        lines.append(f"| {t} | {_value(raw, d, metric):.4f} | {best['recipe']} | {_gain(best, d, metric)} | "
                     f"{_gain(head, d, metric) if head else 'n/a'} |")
    lines += ["", "![held-out loss vs step](loss_vs_step.png)", "",
              "![gain over N x V at early, mid and late points](gain_n_v.png)", "",
              "![methods compared](methods.png)", ""]
    for name, anneal in report["anneal"].items():
        lines += _anneal_section(name, anneal, d, _headline_label(report))
    return "\n".join(lines)


def _gain(row: dict, d: str, metric: str = "loss") -> str:
    diff, se = (x * _scale(row, d, metric) for x in row["vs_raw"][d])  # same windows: same tokens and bytes
    return f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se, 'better', 'worse')})"


def _anneal_section(name: str, rows: list[dict], d: str, label: str) -> list[str]:
    if not rows:
        return [f"## Anneal branch `{name}`", "", "No anneal checkpoint has a full merge window on the constant run.", ""]
    lines = [f"## Annealing prediction: constant-LR merge vs anneal branch `{name}`", "",
             f"At each anneal checkpoint, {label} of the constant-LR run at the same step (equal tokens) against "
             "the annealed checkpoint. `recovered` is the share of the anneal's gain over the raw constant-LR "
             "checkpoint that the merge gets.", "",
             "| step | LR | raw constant | merged constant | annealed | merged - annealed | recovered |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff, se = r["merged_minus_annealed"][d]
        gain = r["raw"][d] - r["annealed"][d]
        recovered = f"{(r['raw'][d] - r['merged'][d]) / gain:.0%}" if gain > 0 else "n/a"
        lr = "?" if r["lr"] is None else f"{r['lr']:.2e}"
        lines.append(f"| {r['step']} | {lr} | {r['raw'][d]:.4f} | {r['merged'][d]:.4f} | {r['annealed'][d]:.4f} | "
                     f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se, 'merge better', 'anneal better')}) | {recovered} |")
    return lines + ["", "![annealing prediction](anneal_prediction.png)", ""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(rows: list[dict], recipe: str, d: str) -> tuple[list[int], list[float]]:
    picked = sorted((r["step"], r["loss"][d]) for r in rows if r["recipe"] == recipe)
    return [s for s, _ in picked], [v for _, v in picked]


def plot_loss_vs_step(report: dict, path: Path) -> None:
    plt, d = _pyplot(), _main_data(report)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(*_curve(report["rows"], "raw", d), "k.-", label="raw checkpoints")
    h = report["headline"]
    for method in report["config"]["methods"]:
        label = method if is_posthoc(method) else f"{method} N={h['n']} V={h['every_steps']}"
        ax.plot(*_curve(report["rows"], label, d), "o-", label=label)
    for name, rows in report["anneal"].items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["annealed"][d] for r in rows], "s--", label=f"anneal branch {name}")
    _finish(ax, "step", f"held-out loss on {d}", "Raw checkpoints and merges along the run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gain_grid(report: dict, path: Path) -> None:
    """Heatmaps of the first method's gain over N x V at the first, middle and last points."""
    import numpy as np

    plt, d, cfg = _pyplot(), _main_data(report), report["config"]
    method = next((m for m in cfg["methods"] if not is_posthoc(m)), cfg["methods"][0])  # a method with N x V
    ns, vs = sorted(cfg["n"]), sorted(cfg["every"])
    points = report["points"]
    picks = sorted({points[0], points[len(points) // 2], points[-1]})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], picks):
        grid = np.full((len(ns), len(vs)), np.nan)
        for r in report["rows"]:
            if r["step"] == t and r["method"] == method and r["n"] in ns:
                grid[ns.index(r["n"]), vs.index(r["every_steps"])] = r["vs_raw"][d][0]
        span = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:+.3f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(vs)), [str(v) for v in vs])
        ax.set_yticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlabel("V (steps)")
        ax.set_ylabel("N")
        ax.set_title(f"{method} gain vs raw, step {t}")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("Blue: merge better than the raw checkpoint (loss difference)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_methods(report: dict, path: Path) -> None:
    plt, d, h = _pyplot(), _main_data(report), report["headline"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in report["config"]["methods"]:
        rows = sorted((r for r in report["rows"] if r["recipe"] == f"{method} N={h['n']} V={h['every_steps']}"),
                      key=lambda r: r["step"])
        ax.errorbar([r["step"] for r in rows], [r["vs_raw"][d][0] for r in rows],
                    yerr=[2 * r["vs_raw"][d][1] for r in rows], marker="o", capsize=3, label=method)
    ax.axhline(0, color="grey", linewidth=1)
    _finish(ax, "step", "merge - raw (nats); error bars 2 SE",
            f"Methods compared at N={h['n']}, V={h['every_steps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_anneal(report: dict, path: Path) -> None:
    plt, d = _pyplot(), _main_data(report)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in report["anneal"].items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["raw"][d] for r in rows], "k.-", label="raw constant LR")
        ax.plot(steps, [r["merged"][d] for r in rows], "o-", label=f"merged constant LR ({_headline_label(report)})")
        ax.plot(steps, [r["annealed"][d] for r in rows], "s--", label=f"annealed ({name})")
    _finish(ax, "step (equal tokens)", f"held-out loss on {d}", "Annealing prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
