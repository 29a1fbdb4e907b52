"""``sweep RUN/phema --method phema:sigma_rel=A/B/C``: each width's loss equals the eval of ``merge --schedule phema``."""

import pytest
from conftest import write_word_corpus

pytest.importorskip("transformers")

from ckptmerge.cli.main import main as cli  # noqa: E402
from ckptmerge.data.batches import eval_windows  # noqa: E402
from ckptmerge.data.tokens import load_tokens  # noqa: E402
from ckptmerge.errors import ConfigError  # noqa: E402
from ckptmerge.evaluation.evaluator import evaluate_model, load_model  # noqa: E402
from ckptmerge.sweep.run import SweepConfig, sweep  # noqa: E402
from ckptmerge.train.trainer import TrainConfig, train  # noqa: E402

WIDTHS = (0.05, 0.07, 0.10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phema-sweep")
    write_word_corpus(root)
    config = TrainConfig(preset="tiny", steps=12, lr=1e-2, warmup_steps=2, batch_size=8, context=32, save_every=6,
                         data=str(root / "train.txt"), seed=3, log_every=1,
                         average=["phema:sigma_rel=0.05/0.10,every=3"])
    train(config, root / "run", progress=False)
    return root


def eval_of_merge(folder, data, n_tokens):
    """The post-hoc merge's own evaluation: the written folder loaded and scored like ``ckptmerge eval``."""
    model = load_model(folder)
    windows = eval_windows(load_tokens(data), n_tokens=n_tokens, context=model.config.max_position_embeddings)
    return evaluate_model(model, windows).loss


def test_sweep_scores_each_width_as_the_posthoc_merge_evaluates_it(run, tmp_path):
    data = str(run / "val.txt")
    cfg = SweepConfig(methods=["phema:sigma_rel=" + "/".join(map(str, WIDTHS))], n=[2], at=[6, 12], data=[data],
                      n_tokens=512)
    report = sweep(run / "run" / "phema", cfg, tmp_path / "sweep", progress=False, log=lambda *_: None)
    assert report["config"]["methods"] == [f"phema:sigma_rel={w}" for w in WIDTHS]
    rows = {(r["recipe"], r["step"]): r for r in report["rows"]}
    for width in WIDTHS:
        out = tmp_path / f"merged-{width}"
        assert cli(["merge", str(run / "run" / "phema"), "-o", str(out), "--schedule", f"phema:sigma_rel={width}",
                    "--quiet"]) == 0
        assert rows[(f"phema:sigma_rel={width}", 12)]["loss"][data] == pytest.approx(
            eval_of_merge(out, data, 512), abs=2e-5), width
    # at step 6 only the snapshots up to step 6 are merged: the same as merging that part of the folder
    early = [str(p) for p in sorted((run / "run" / "phema").iterdir()) if p.name.endswith(("000003", "000006"))]
    assert len(early) == 4
    out = tmp_path / "early"
    assert cli(["merge", *early, "-o", str(out), "--schedule", "phema:sigma_rel=0.07", "--quiet"]) == 0
    assert rows[("phema:sigma_rel=0.07", 6)]["loss"][data] == pytest.approx(eval_of_merge(out, data, 512), abs=2e-5)
    # the baseline is the narrowest stored profile (0.05), so its own width gains exactly nothing
    assert rows[("phema:sigma_rel=0.05", 12)]["vs_raw"][data][0] == pytest.approx(0.0, abs=1e-6)
    assert "narrowest stored profile" in report["baseline"]
    markdown = (tmp_path / "sweep" / "report.md").read_text()
    assert "phema:sigma_rel=" in markdown and "narrowest stored profile" in markdown


def test_sweep_refuses_window_methods_on_snapshots_and_phema_on_plain_checkpoints(run, tmp_path):
    data = str(run / "val.txt")
    with pytest.raises(ConfigError, match="power-EMA snapshots, so --method sma") as caught:
        sweep(run / "run" / "phema", SweepConfig(methods=["phema:sigma_rel=0.07", "sma"], data=[data]),
              tmp_path / "a", progress=False, log=lambda *_: None)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="plain checkpoints, but --method phema:sigma_rel=0.07") as caught:
        sweep(run / "run", SweepConfig(methods=["phema:sigma_rel=0.07"], data=[data]), tmp_path / "b",
              progress=False, log=lambda *_: None)
    assert "\n" not in str(caught.value)
