"""``ckptmerge reproduce all --scale test``: the whole pipeline at a tiny scale (structure and consistency).

The numbers at this scale mean nothing; the test checks that every report is written, every record
has >= 3 seeds and one of the four outcomes consistent with its own interval and margin, the LAWA
spans are reported, and a rerun resumes (trains nothing new).
"""

import json
import re

import pytest

pytest.importorskip("transformers")

from ckptmerge.reproduce.run import reproduce  # noqa: E402
from ckptmerge.reproduce.scale import make_scale  # noqa: E402
from ckptmerge.reproduce.stats import OUTCOMES, outcome  # noqa: E402

ALWAYS = ["e1-lawa-vs-raw", "e2-lawa-spacing", "e3-ema-baselines", "e5-bo-pair-merge", "e6-pma-vs-anneal",
          "e7-weighting-schemes", "e8-v-and-n", "e11-hessian-cross-term"]


def test_test_scale_reproduction_writes_consistent_reports(tmp_path):
    work, reports = tmp_path / "work", tmp_path / "reports"
    scale = make_scale("test", seeds=[3, 4, 5])
    done = reproduce("all", scale=scale, work=work, reports=reports, log=lambda *_: None)
    keys = [e.key for e in done]
    assert set(ALWAYS) <= set(keys)
    index = (reports / "README.md").read_text()
    for key in keys:
        folder = reports / key
        text = (folder / "report.md").read_text()
        results = json.loads((folder / "results.json").read_text())
        assert results["claims"] and f"{key}/report.md" in index and results["settings"]["seeds"] == [3, 4, 5]
        for r in results["claims"]:
            assert r["outcome"] in OUTCOMES and len(r["seeds"]) >= 3 and len(r["per_seed"]) == len(r["seeds"])
            assert r["outcome"] == outcome(r["direction"], r["ci_low"], r["ci_high"], r["margin"])
            assert r["ci_low"] <= r["effect"] <= r["ci_high"]
            assert f"**{r['outcome']}**" in text
        for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
            assert (folder / image).stat().st_size > 1000, f"{key}: {image} missing"
    # the spike design (an LR surge 60% into the run) makes every seed's spike rule fire: E4 and E9 are reported
    spiked = json.loads((reports / "e4-spike-smoothing" / "results.json").read_text())["settings"]
    assert len(spiked["spike_step_per_seed"]) == 3 and {"e4-spike-smoothing", "e9-spike-recovery"} <= set(keys)
    first = spiked["spike_surge"][0]
    assert all(first < step <= first + 10 for step in spiked["spike_step_per_seed"].values())
    spans = (reports / "e2-lawa-spacing" / "report.md").read_text()
    assert re.search(r"5% \(nu=\d+, [\d.]+% of the run\)", spans)
    # a rerun trains nothing new: every run's trajectory is reused
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/trajectory.pt")}
    reproduce("lawa", scale=scale, work=work, reports=reports, log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/trajectory.pt")} == stamps
    # more seeds join the same work folder; each record then shows the outcome of the first 3 beside all 4
    reproduce("bo", scale=make_scale("test", seeds=[3, 4, 5, 6]), work=work, reports=reports, log=lambda *_: None)
    results = json.loads((reports / "e5-bo-pair-merge" / "results.json").read_text())
    for r in results["claims"]:
        assert r["seeds"] == [3, 4, 5, 6] and r["first_seeds"]["seeds"] == [3, 4, 5]
        assert r["first_seeds"]["outcome"] == outcome(r["direction"], r["first_seeds"]["ci_low"],
                                                      r["first_seeds"]["ci_high"], r["first_seeds"]["margin"])
    assert "first 3 seeds" in (reports / "e5-bo-pair-merge" / "report.md").read_text()
    assert "first 3 seeds" in (reports / "README.md").read_text()
