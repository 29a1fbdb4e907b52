"""``ckptmerge reproduce all --quick``: every experiment writes a complete report (structure, not verdicts)."""

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("optuna")

from ckptmerge.reproduce.run import reproduce  # noqa: E402
from ckptmerge.reproduce.verdicts import FAILS, HOLDS, UNSURE  # noqa: E402

EXPERIMENTS = ["e1-lawa-vs-raw", "e2-lawa-spacing", "e3-ema-swa-baselines", "e4-spike-smoothing", "e5-bo-pair-merge",
               "e6-pma-vs-anneal", "e7-weighting-schemes", "e8-v-and-n", "e9-spike-recovery",
               "e10-pma-init-continued-training"]


def test_quick_reproduction_writes_every_report(tmp_path):
    done = reproduce("all", quick=True, work=tmp_path / "work", reports=tmp_path / "reports", progress=False,
                     log=lambda *_: None)
    assert [e.key for e in done] == EXPERIMENTS
    index = (tmp_path / "reports" / "README.md").read_text()
    for key in EXPERIMENTS:
        folder = tmp_path / "reports" / key
        text = (folder / "report.md").read_text()
        results = json.loads((folder / "results.json").read_text())
        assert results["claims"] and "## Verdicts" in text and f"{key}/report.md" in index
        for claim in results["claims"]:
            assert claim["verdict"] in (HOLDS, FAILS, UNSURE)
            assert len(claim["per_seed"]) == 2  # two seeds behind every claim
            assert f"**{claim['verdict']}**" in text
        for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
            assert (folder / image).stat().st_size > 1000, f"{key}: {image} missing"
    # a rerun trains nothing and scores nothing new: every run and evaluation is reused
    cache_lines = (tmp_path / "work" / "evals.jsonl").read_text().count("\n")
    reproduce("pma", quick=True, work=tmp_path / "work", reports=tmp_path / "reports", progress=False,
              log=lambda *_: None)
    assert (tmp_path / "work" / "evals.jsonl").read_text().count("\n") == cache_lines
