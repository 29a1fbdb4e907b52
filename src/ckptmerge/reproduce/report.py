"""Write one experiment's ``report.md`` + ``results.json`` + PNGs, and the index of all verdicts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckptmerge.io.publish import atomic_folder
from ckptmerge.reproduce.stats import RULES, Claim


@dataclass
class Experiment:
    """What an experiment found: claims (outcomes computed in ``stats``), tables (markdown), plots, notes."""

    key: str
    title: str
    paper: str
    statement: str
    setup: str
    claims: list[Claim] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    draw: Callable[[Path], None] | None = None   # draws the plots into a folder


def publish(reports: Path, exp: Experiment, settings: dict) -> None:
    """Write ``reports/<key>/`` (report.md, results.json, plots) atomically."""
    with atomic_folder(reports / exp.key, force=True) as tmp:
        if exp.draw is not None:
            exp.draw(tmp)
        untested = [c for c in exp.claims if len(c.seeds) < 3]
        exp.notes += [f"Not tested: {c.key} {c.statement} (only {len(c.seeds)} seeds had the data; a claim needs 3)."
                      for c in untested]
        exp.claims = [c for c in exp.claims if len(c.seeds) >= 3]
        records = [c.result() for c in exp.claims]
        (tmp / "results.json").write_text(json.dumps(
            {"key": exp.key, "title": exp.title, "settings": settings, "claims": records, "data": exp.data},
            indent=2, default=float) + "\n")
        (tmp / "report.md").write_text(render(exp, records, settings))


def _num(x: float) -> str:
    return "nan" if x != x else f"{x:+.4f}"


def _side(records: list[dict]) -> bool:
    """Whether the records carry the first-3-seeds outcome (some claim ran on more seeds)."""
    return any("first_seeds" in r for r in records)


def _first(r: dict) -> str:
    f = r.get("first_seeds")
    if not f:
        return "-"
    changed = " (changed)" if f["outcome"] != r["outcome"] else ""
    return f"{_num(f['effect'])} [{_num(f['ci_low'])}, {_num(f['ci_high'])}], {f['outcome']}{changed}"


def render(exp: Experiment, records: list[dict], settings: dict) -> str:
    quick = settings.get("name") != "full"
    lines = [f"# {exp.title}", ""]
    if quick:
        lines += [f"> **{settings.get('name')} scale**: verdicts of the reduced `--{settings.get('name')}` run "
                  "(fewer steps than the design's full scale); read them as what this scale can tell.", ""]
    lines += [f"**Paper:** {exp.paper}", "", f"**The paper's statement.** {exp.statement}", "",
              f"**Setup.** {exp.setup}", "", "## Claims", "",
              "| claim | per seed (d ± window SE) | pooled effect | CI | margin | outcome |"
              + (" first 3 seeds: effect [CI], outcome |" if _side(records) else ""),
              "|---|---|---|---|---|---|" + ("---|" if _side(records) else "")]
    for r in records:
        star = "**\\*** " if r["primary"] else ""
        per = ", ".join(f"{d:+.4f} ± {se:.4f}" for d, se in zip(r["per_seed"], r["per_seed_se"]))
        lines.append(f"| {star}{r['claim']} ({r['direction']}) | {per} (seeds {r['seeds']}) | {_num(r['effect'])} | "
                     f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}] ({r['ci_level']:.1%}) | {r['margin']:.4f} | "
                     f"**{r['outcome']}** |" + (f" {_first(r)} |" if _side(records) else ""))
    lines += ["", "\\* primary claim (Holm-corrected across all reports' primary claims). Effects are in nats "
              "per byte, scored on the odd evaluation windows (half B); anything chosen (a lambda, the best EMA) "
              "was chosen on the even windows (half A).", "", "How each number is computed:", ""]
    lines += [f"- {r['claim']}: {r['detail']}" + (f" ({r['note']})" if r["note"] else "") for r in records]
    lines += ["", "<details><summary>Outcome rules</summary>", "", RULES, "", "</details>", ""]
    for table in exp.tables:
        lines += [table, ""]
    lines += [f"![{p}]({p})" for p in exp.plots]
    if exp.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in exp.notes]
    return "\n".join(lines) + "\n"


def write_index(reports: Path, command: str, settings: dict, seconds: float) -> Path:
    """``reports/README.md``: every experiment found under ``reports`` with its outcomes."""
    rows, found = [], []
    for results in sorted(reports.glob("*/results.json"), key=lambda p: int(p.parent.name.split("-")[0][1:])):
        data = json.loads(results.read_text())
        found += [(results.parent.name, data["title"], c) for c in data["claims"]]
    side = _side([c for _, _, c in found])
    for folder, title, c in found:
        star = "\\* " if c["primary"] else ""
        rows.append(f"| [{title}]({folder}/report.md) | {star}{c['claim']} | "
                    f"{_num(c['effect'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}] | {c['margin']:.4f} | "
                    f"**{c['outcome']}** |" + (f" {_first(c)} |" if side else ""))
    scale = settings.get("name")
    text = "\n".join(["# Reproduction of the three papers' claims at small scale", "",
                      f"Written by `{command}` ({seconds / 60:.0f} min on this machine including runs reused from "
                      f"earlier invocations' work folder, if any). Scale: **{scale}**"
                      + (" (a reduced run: fewer steps and a smaller batch than the design in docs/methods.md; the "
                         "full design is `ckptmerge reproduce all`)" if scale != "full" else "") + ".", "",
                      "Every outcome is computed from the numbers in the linked report: the pooled effect over "
                      "seeds, its confidence interval and a margin fixed in advance (docs/methods.md); none is "
                      "hand-written. \\* marks the primary claims (Holm-corrected).", "",
                      f"Settings: `{json.dumps(settings)}`", "",
                      "| experiment | claim | effect [CI] | margin | outcome |"
                      + (" first 3 seeds: effect [CI], outcome |" if side else ""),
                      "|---|---|---|---|---|" + ("---|" if side else ""), *rows, ""])
    path = reports / "README.md"
    for name, content in (("run.json", json.dumps({"command": command, "seconds": round(seconds, 1),
                                                    "settings": settings}, indent=2) + "\n"), ("README.md", text)):
        tmp = reports / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(reports / name)  # run.json: the invocation and its wall time, for scripts/update_readme_results.py
    return path


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, title: str, xlabel: str, ylabel: str,
              vlines: dict[str, float] | None = None, errors: dict[str, list] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, (x, y) in series.items():
        if errors and label in errors:
            ax.errorbar(x, y, yerr=errors[label], marker="o", markersize=3, capsize=2, label=label)
        else:
            ax.plot(x, y, marker=".", label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, color="grey", linestyle=":", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]])
