"""Write one experiment's ``report.md`` + ``results.json`` + PNGs, and the index of all verdicts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckptmerge.io.publish import atomic_folder
from ckptmerge.reproduce.verdicts import RULES, Claim


@dataclass
class Experiment:
    """What an experiment found: claims with verdicts, tables (markdown), plots (file names), notes."""

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


def publish(reports: Path, key: str, build: Callable[[Path], Experiment]) -> Experiment:
    """Run ``build(folder)`` (it draws its plots into ``folder``) and publish ``reports/key`` atomically."""
    with atomic_folder(reports / key, force=True) as tmp:
        exp = build(tmp)
        (tmp / "results.json").write_text(json.dumps(
            {"key": exp.key, "title": exp.title, "claims": [c.to_dict() for c in exp.claims], "data": exp.data},
            indent=2) + "\n")
        (tmp / "report.md").write_text(render(exp))
    return exp


def render(exp: Experiment) -> str:
    lines = [f"# {exp.title}", "", f"**Paper:** {exp.paper}", "", f"**The paper's statement.** {exp.statement}", "",
             f"**Setup.** {exp.setup}", "", "## Verdicts", "",
             "| claim | per seed | verdict |", "|---|---|---|"]
    for c in exp.claims:
        tol = f" (tolerance {c.tol} nats)" if c.kind in ("close", "at_most") else ""
        lines.append(f"| {c.statement}{tol} | {c.numbers()} | **{c.verdict}** |")
    lines += ["", "How each number is computed:", ""]
    lines += [f"- {c.statement}: {c.detail}" for c in exp.claims if c.detail]
    lines += ["", "<details><summary>Verdict rules</summary>", "", RULES, "", "</details>", ""]
    for table in exp.tables:
        lines += [table, ""]
    lines += [f"![{p}]({p})" for p in exp.plots]
    if exp.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in exp.notes]
    return "\n".join(lines) + "\n"


def write_index(reports: Path, command: str, seconds: float) -> Path:
    """``reports/README.md``: every experiment found under ``reports`` with its verdicts."""
    rows = []
    for results in sorted(reports.glob("*/results.json")):
        data = json.loads(results.read_text())
        for c in data["claims"]:
            rows.append(f"| [{data['title']}]({results.parent.name}/report.md) | {c['statement']} | **{c['verdict']}** |")
    text = "\n".join(["# Reproduction of the three papers' claims at small scale", "",
                      f"Written by `{command}` ({seconds / 60:.0f} min on this machine, runs reused from earlier "
                      "invocations not counted). Every verdict is computed from the numbers in the linked report "
                      "(rules in each report); no verdict is hand-written.", "",
                      "| experiment | claim | verdict |", "|---|---|---|", *rows, ""])
    path = reports / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
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
