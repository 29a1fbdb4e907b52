"""``ckptmerge watch --report OUT``: loss vs step for the raw run and every method, from what the watch recorded.

Writes ``OUT/report.png`` (one panel per data set; needs matplotlib, the ``plots`` extra) and ``OUT/report.html``
(the same picture inlined, and the table of numbers: a self-contained page for a user without a tracker).
For an ``-o`` URL both are drawn in the watch's working folder and uploaded beside its outputs, one PUT each.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from ckptmerge.errors import CkptMergeError, import_optional
from ckptmerge.io.remote import Url, as_location, redact
from ckptmerge.online.watch_publish import Publication, publish, work_dir_for
from ckptmerge.online.watch_state import STATE_FILE, load_recorded

_LOSS = re.compile(r"^eval/(?:raw|merged/(?P<method>[^/]+))/(?P<data>.+)/loss$")


def curves(evals: dict[str, dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{data: {"raw" or method: (steps, losses)}}`` from the recorded metrics."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for step in sorted(evals, key=int):
        for key, value in evals[step].items():
            match = _LOSS.match(key)
            if match:
                steps, losses = out.setdefault(match["data"], {}).setdefault(match["method"] or "raw", ([], []))
                steps.append(int(step))
                losses.append(value)
    return out


def report(output: str, work_dir: str | None = None) -> list[str]:
    """``watch --report``: draw the report of the watch publishing to ``output`` (a folder or a URL); for a URL,
    draw it in the working folder and upload both files. Returns a line per file."""
    target = as_location(output)
    written = write_report(work_dir_for(target, work_dir))
    if not isinstance(target, Url):
        return [f"wrote {path}" for path in written]
    for path in written:
        publish(target, path.parent, Publication.file(path.name, path.read_bytes()))
    return [f"wrote {path}, uploaded to {redact(str(target / path.name))}" for path in written]


def write_report(out: Path) -> list[Path]:
    """Draw the report of the watch at ``out``; returns the files written."""
    evals = load_recorded(out)
    if not evals:
        raise CkptMergeError(f"{out}: no evaluations recorded yet (run watch with --data, and see {STATE_FILE})")
    series = curves(evals)
    png = _plot(series)
    (out / "report.png").write_bytes(png)
    (out / "report.html").write_text(_page(series, png))
    return [out / "report.png", out / "report.html"]


def _plot(series: dict) -> bytes:
    matplotlib = import_optional("matplotlib", extra="plots", needed_by="watch --report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (data, lines) in zip(axes[0], series.items()):
        for name, (steps, losses) in lines.items():
            ax.plot(steps, losses, marker="o", markersize=3, label=name, linewidth=2 if name == "raw" else 1.2)
        ax.set(title=data, xlabel="step", ylabel="held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _page(series: dict, png: bytes) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>ckptmerge watch</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style>",
             "<h1>Held-out loss: raw checkpoints and merges</h1>",
             f"<img alt='loss vs step' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    for data, lines in series.items():
        names = list(lines)
        steps = sorted({s for steps, _ in lines.values() for s in steps})
        value = {(n, s): v for n, (ss, vs) in lines.items() for s, v in zip(ss, vs)}
        parts.append(f"<h2>{html.escape(data)}</h2><table><tr><th>step</th>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        for s in steps:
            cells = "".join(f"<td>{value[(n, s)]:.4f}</td>" if (n, s) in value else "<td></td>" for n in names)
            parts.append(f"<tr><td>{s}</td>{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"
