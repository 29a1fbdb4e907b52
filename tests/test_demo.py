"""The demo end to end on a generated corpus (quick mode): report, plot, and numbers that agree."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from ckptmerge.demo.run import DemoConfig, run_demo  # noqa: E402


def test_quick_demo_writes_a_consistent_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
    (tmp_path / "train.txt").write_text(" ".join(rng.choice(words, 8000)))
    (tmp_path / "other.txt").write_text(" ".join(rng.choice(words[:5], 3000)))
    cfg = DemoConfig.quick(out=str(tmp_path / "demo"), data=str(tmp_path / "train.txt"),
                           eval_data=[str(tmp_path / "train.txt"), str(tmp_path / "other.txt")])
    report = run_demo(cfg, progress=False, log=lambda *_: None)

    out = tmp_path / "demo"
    assert (out / "loss_vs_step.png").stat().st_size > 10_000
    assert "Verdicts" in (out / "report.md").read_text()
    saved = json.loads((out / "report.json").read_text())
    labels = list(saved["table"])
    assert labels[0].startswith("last constant-LR") and labels[-1].startswith("annealed") and len(labels) == 5
    # paired differences agree with the per-model means they are computed from
    d = saved["in_domain"]
    for label, by_data in saved["versus_last"].items():
        assert by_data[d]["diff"] == pytest.approx(saved["table"][label][d]["loss"] - saved["table"][labels[0]][d]["loss"],
                                                  abs=1e-9)
    # the merges really are merges of the last N stable checkpoints with the PMA coefficients
    manifest = json.loads((out / "merged" / "wma" / "merge.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [45, 50, 55, 60]
    assert np.allclose([i["coefficient"] for i in manifest["inputs"]], [0.1, 0.2, 0.3, 0.4])
    assert [s for s, _ in saved["curves"]["anneal"]] == [50, 55, 60]
    assert report["config"]["steps"] == 60

    # a second run reuses the finished runs; other settings in the same folder are refused
    again = run_demo(cfg, progress=False, log=lambda *_: None)
    assert again["table"] == report["table"]
    from ckptmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        run_demo(DemoConfig.quick(out=cfg.out, data=cfg.data, eval_data=cfg.eval_data, lr=1e-3),
                 progress=False, log=lambda *_: None)
