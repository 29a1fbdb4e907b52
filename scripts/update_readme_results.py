"""Regenerate the README's reproduction summary from reports/*/results.json (run after `ckptmerge reproduce`).

One sentence each for what holds, what is reversed and what cannot be told at this scale, with the
pooled effects and confidence intervals; the verdicts themselves come from the reports.
"""
import json
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
records, settings = [], {}
for res in sorted(root.glob("reports/*/results.json"), key=lambda p: int(re.match(r"e(\d+)", p.parent.name).group(1))):
    data = json.loads(res.read_text())
    settings = data.get("settings", settings)
    records += [(res.parent.name, c) for c in data["claims"]]


def cite(key, c):
    return (f"{c['key']} {c['claim']} ({c['effect']:+.3f} nats, CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
            f"margin {c['margin']:.3f}; [report](reports/{key}/report.md))")


def sentence(label, outcomes):
    chosen = [cite(k, c) for k, c in records if c["outcome"] in outcomes]
    return f"**{label}** ({len(chosen)} of {len(records)} claims): " + ("; ".join(chosen) if chosen else "none") + "."


scale = settings.get("name", "?")
seeds = settings.get("seeds", [])
flag = "--quick" if scale == "quick" else f"--scale {scale}"
scale_line = (f"These are the **{scale}-scale** verdicts (`ckptmerge reproduce all {flag}`: {settings.get('lawa_steps')}"
              f"-step LAWA runs, {settings.get('wsd_steps')}-step WSD runs, batch {settings.get('batch_size')}, seeds "
              f"{seeds}); the design's full scale is `ckptmerge reproduce all` (about 100 minutes on an idle 2-core "
              "machine; resumable with the same `--work`)." if scale != "full" else
              f"Full scale (`ckptmerge reproduce all`), seeds {seeds}.")
if scale == "test":
    scale_line += (" **The test scale is the CI pipeline check: its runs are far too short to say anything about the "
                   "papers, so read the outcomes below as what a 40-60-step run shows, not as findings.** Neither the "
                   "quick nor the full reproduction has been completed and committed yet: run `ckptmerge reproduce all "
                   "--quick` (14 minutes on 2 shared cores) or `ckptmerge reproduce all`, then copy "
                   "its reports into `reports/` and rerun this script.")
spiking = settings.get("diverging_spike_seeds")
n_spike = len(seeds) + settings.get("spike_extra_seeds", 0)
spike_design = (f"an LR surge to {settings['spike_surge'][2]:g}x the tuned LR for {settings['spike_surge'][1]} steps, "
                "clipping off" if settings.get("spike_surge") else
                f"constant LR {settings.get('spike_lr_factor')}x the tuned one, clipping off")
spike_line = (f"E4 and E9 (restarts after a loss spike) are not reported: {len(spiking)} of {n_spike} spike runs "
              f"({spike_design}) spiked, and they need 3 spiking seeds." if spiking is not None and len(spiking) < 3
              else "")
if spike_line and not settings.get("spike_surge"):
    spike_line += (" The spike design has since become an LR surge after which every tried seed's spike rule fires "
                   "(docs/methods.md, spike design); these full-scale runs predate it.")
changed = [(k, c) for k, c in records if c.get("first_seeds") and c["first_seeds"]["outcome"] != c["outcome"]]
seeds_line = ("" if not any(c.get("first_seeds") for _, c in records) else
              f"With all seeds instead of the first 3, {len(changed)} outcomes change: "
              + ("; ".join(f"{c['key']} {c['first_seeds']['outcome']} -> {c['outcome']}" for _, c in changed) or "none")
              + " (each report shows both side by side).")
quick = root / "reports" / "quick" / "run.json"
quick_line = ""
if quick.is_file():
    q = json.loads(quick.read_text())
    quick_claims = [c for res in sorted(quick.parent.glob("*/results.json")) for c in json.loads(res.read_text())["claims"]]
    counts = ", ".join(f"{sum(c['outcome'] == o for c in quick_claims)} {o}" for o in
                       ("holds", "reversed", "no detectable effect", "inconclusive"))
    spiked = q["settings"].get("spike_step_per_seed") or {}
    full = {c["key"]: c["outcome"] for _, c in records}
    shared = [c for c in quick_claims if c["key"] in full]
    differ = sum(c["outcome"] != full[c["key"]] for c in shared)
    quick_line = (f"`{q['command']}` ran end to end from an empty work folder in {q['seconds'] / 60:.0f} minutes of wall "
                  "time (2 CPU cores shared with other jobs; training and evaluation included). Its reports, in "
                  "[reports/quick/](reports/quick/README.md), have the design's claims, columns and outcome rules"
                  + ("" if q["settings"].get("extreme_arm") else " (without E1f: the quick scale trains no extreme-LR "
                     "arm)") + f": of {len(quick_claims)} claims, {counts}; E4 and E9 are reported there ("
                  f"{len(spiked)} spike seeds spiked, at steps {sorted(spiked.values())}). Quick-scale outcomes may "
                  f"differ from the full scale's ({differ} of the {len(shared)} claims both report do): its runs are "
                  "about 1/10 as long at half the batch.")
more = root / "reports" / "quick-5seeds" / "run.json"
if quick_line and more.is_file():
    m = json.loads(more.read_text())
    claims5 = [c for res in sorted(more.parent.glob("*/results.json")) for c in json.loads(res.read_text())["claims"]]
    moved = [c for c in claims5 if c.get("first_seeds") and c["first_seeds"]["outcome"] != c["outcome"]]
    added = [s for s in m["settings"]["seeds"] if s not in q["settings"]["seeds"]]
    quick_line += (f" `{m['command']}` then added seeds {', '.join(map(str, added))} to the same work folder ({m['seconds'] / 60:.0f} more "
                   "minutes; [reports/quick-5seeds/](reports/quick-5seeds/README.md), every primary claim on >= 5 seeds, "
                   f"each outcome beside its first 3 seeds'): {len(moved)} of {len(claims5)} outcomes change ("
                   + "; ".join(f"{c['key']} {c['first_seeds']['outcome']} -> {c['outcome']}" for c in moved) + ").")
section = "\n".join([
    "## The papers' claims, reproduced at small scale", "",
    "`ckptmerge reproduce all` trains every run the claims need (LR sweep, cosine LAWA runs at the tuned and",
    "the high LR, WSD runs with an anneal fork, diverging runs and restarts; >= 3 seeds), and writes one",
    "report per experiment under [reports/](reports/README.md): the paper's statement, per-seed numbers, the",
    "pooled effect with a confidence interval (across-seed t spread plus window SE; primary claims",
    "Holm-corrected) and one of four outcomes against a margin fixed in advance (docs/methods.md).",
    "This summary is generated by `python scripts/update_readme_results.py`; effects are held-out loss",
    "differences in nats/byte, negative meaning the first model named is better.", "",
    " ".join(x for x in (scale_line, spike_line, seeds_line) if x), "",
    *([quick_line, ""] if quick_line else []),
    "- " + sentence("Holds", ("holds",)),
    "- " + sentence("Reversed", ("reversed",)),
    "- " + sentence("No detectable effect (the interval lies inside the margin)", ("no detectable effect",)),
    "- " + sentence("Cannot be told at this scale (inconclusive)", ("inconclusive",)),
    ""])
readme = (root / "README.md").read_text()
start, end = "<!-- reproduce:start -->", "<!-- reproduce:end -->"
readme = readme[:readme.index(start) + len(start)] + "\n" + section + readme[readme.index(end):]
(root / "README.md").write_text(readme)
