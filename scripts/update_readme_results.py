"""Regenerate the README's table of reproduction verdicts from reports/*/results.json (run after `ckptmerge reproduce`)."""
import json
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
rows = []
for res in sorted(root.glob("reports/*/results.json"), key=lambda p: int(re.match(r"e(\d+)", p.parent.name).group(1))):
    d = json.loads(res.read_text())
    counts = {}
    for c in d["claims"]:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    first = d["claims"][0]
    nums = ", ".join(f"{v[0]:+.3f} ± {v[1]:.3f}" if isinstance(v, list) else ("yes" if v else "no") for v in first["per_seed"])
    rows.append(f"| [{d['title']}](reports/{res.parent.name}/report.md) | "
                + ", ".join(f"{n} {k}" for k, n in counts.items()) + f" | {first['statement']}: {nums} ({first['verdict']}) |")
section = "\n".join(["## The papers' claims, reproduced at small scale", "",
    "`ckptmerge reproduce all` trains two seeds of every run (tiny model, CPU) and writes one report per",
    "experiment under [reports/](reports/README.md), with the paper's statement, the numbers, plots and a",
    "verdict computed from them (holds / does not hold / inconclusive; the rules are in each report).",
    "The table is generated from `reports/*/results.json` by `python scripts/update_readme_results.py`",
    "(per seed: paired difference ± SE in nats/byte; negative means the first model named is better).", "",
    "| experiment | verdicts | first claim, per seed |", "|---|---|---|", *rows, "",
    "In short: at constant LR (the WSD stable phase) merging gains about 0.1 nats and ends 0.01-0.02 nats",
    "short of the annealed model, and PMA-init helps continued training. In 1,000-step cosine runs the LAWA window",
    "(5 checkpoints, 50 steps apart) lags a model that is still improving fast, so LAWA's claims do not",
    "hold at this scale; and a merged restart after a recoverable spike did not beat a plain restart.", ""])
readme = (root / "README.md").read_text()
start, end = "<!-- reproduce:start -->", "<!-- reproduce:end -->"
if start in readme:
    readme = readme[:readme.index(start) + len(start)] + "\n" + section + readme[readme.index(end):]
else:
    readme = readme.replace("## Command line", f"{start}\n{section}{end}\n\n## Command line", 1)
(root / "README.md").write_text(readme)
