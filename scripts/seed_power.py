"""How many seeds each primary claim needs: a power calculation from the reports' per-seed numbers.

    python scripts/seed_power.py                       # table on stdout, from reports/*/results.json
    python scripts/seed_power.py --write docs/methods.md   # ... and into that file between its markers

For a claim with per-seed effects d_s and window SEs se_s (``results.json``), the reports' interval
(``reproduce/stats.py``) at n seeds has the half-width

    h(n) = t_{n-1, 1 - a/2} * sqrt((s^2 + mean_s se_s^2) / n)

with s the observed across-seed SD and a the claim's level. Two levels are shown: the Holm level the
report used (``ci_level``) and the worst Holm level, a / m, where m is the size of the primary family
once E4a and E9a join it (every primary claim of the design). Columns:

- *n: h < margin*: the smallest n whose half-width is below the claim's margin at the worst level:
  the interval is then narrower than the margin, so the claim cannot stay inconclusive for lack of
  seeds unless its effect sits within a half-width of the margin.
- *n: decides the observed effect*: the smallest n at the worst level with h(n) < | |effect| - margin |,
  i.e. the observed pooled effect would end as holds / reversed / no detectable effect rather than
  inconclusive (infinite when the effect is at the margin).
- *run*: max(5, n: h < margin), the seeds the design runs (issue 28: at least 5 per primary claim).

The spread s of 3 seeds is itself uncertain (its 95% interval is about 0.5 s to 6 s): the numbers are a
plan, not a guarantee, and are recomputed from the reports after more seeds have run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from pathlib import Path

from scipy import stats as sps

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 0.05
DESIGN_PRIMARIES = {"E1a", "E1c", "E1d", "E3a", "E4a", "E5a", "E6a", "E8b", "E9a", "E11a"}  # docs/methods.md
N_MAX = 200
START, END = "<!-- seed-power:start -->", "<!-- seed-power:end -->"


def half_width(n: int, spread2: float, level: float) -> float:
    return float(sps.t.ppf(1 - (1 - level) / 2, n - 1)) * math.sqrt(spread2 / n)


def seeds_for(target: float, spread2: float, level: float) -> int | None:
    """The smallest n >= 3 with half_width(n) < target (None past N_MAX or for a target <= 0)."""
    if not target > 0:
        return None
    return next((n for n in range(3, N_MAX + 1) if half_width(n, spread2, level) < target), None)


def load(reports: Path) -> list[dict]:
    claims = []
    for path in sorted(reports.glob("*/results.json"), key=lambda p: int(re.match(r"e(\d+)", p.parent.name)[1])):
        data = json.loads(path.read_text())
        link = os.path.relpath(path.parent / "report.md", ROOT / "docs")  # the table lives in docs/methods.md
        claims += [dict(c, report=link) for c in data["claims"] if c["primary"]]
    return claims


def rows(claims: list[dict]) -> list[dict]:
    family = len(DESIGN_PRIMARIES | {c["key"] for c in claims})
    worst = 1 - ALPHA / family
    out = []
    for c in claims:
        d, se = c["per_seed"], c["per_seed_se"]
        s, within = statistics.stdev(d), sum(x * x for x in se) / len(se)
        spread2 = s * s + within
        n_margin = seeds_for(c["margin"], spread2, worst)
        n_decide = seeds_for(abs(abs(c["effect"]) - c["margin"]), spread2, worst)
        out.append({"key": c["key"], "claim": c["claim"], "report": c["report"], "seeds": len(d), "sd": s,
                    "window_se": math.sqrt(within), "effect": c["effect"], "margin": c["margin"],
                    "level": c["ci_level"], "half_now": half_width(len(d), spread2, c["ci_level"]),
                    "worst_level": worst, "n_margin": n_margin, "n_decide": n_decide,
                    "run": max(5, n_margin) if n_margin else None, "outcome": c["outcome"]})
    return out


def markdown(table: list[dict], command: str) -> str:
    fmt = lambda n: str(n) if n else f"> {N_MAX}"
    lines = [f"Computed by `{command}` from its reports' `results.json`; worst Holm level 1 - 0.05/"
             f"{len(DESIGN_PRIMARIES)} = {table[0]['worst_level']:.2%}."
             if table else f"`{command}`: no primary claims in the reports.", "",
             ("| claim | seeds now | outcome now | effect | seed SD | window SE | margin | half-width now (level) | "
              "n: h < margin | n: decides the observed effect | seeds to run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| [{r['key']}]({r['report']}) {r['claim']} | {r['seeds']} | {r['outcome']} | "
                     f"{r['effect']:+.4f} | {r['sd']:.4f} | {r['window_se']:.4f} | {r['margin']:.4f} | "
                     f"{r['half_now']:.4f} ({r['level']:.2%}) | {fmt(r['n_margin'])} | {fmt(r['n_decide'])} | "
                     f"{fmt(r['run'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", default=str(ROOT / "reports"))
    p.add_argument("--write", help=f"a file whose text between {START} and {END} is replaced by the table")
    p.add_argument("--json", action="store_true", help="the rows as JSON instead of markdown")
    args = p.parse_args()
    table = rows(load(Path(args.reports)))
    command = "python scripts/seed_power.py" + (f" --reports {args.reports}" if args.reports != str(ROOT / "reports")
                                                else "")
    text = json.dumps(table, indent=2) if args.json else markdown(table, command)
    print(text)
    if args.write:
        path = Path(args.write)
        doc = path.read_text()
        if START not in doc or END not in doc:
            raise SystemExit(f"{path}: no {START} ... {END} markers")
        path.write_text(doc[:doc.index(START) + len(START)] + "\n" + markdown(table, command) + "\n" + doc[doc.index(END):])


if __name__ == "__main__":
    main()
