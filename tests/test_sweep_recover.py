"""Sweep, spike detection and PMA-init recovery on a tiny real run, against independent references."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import write_word_corpus

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from ckptmerge.data.batches import eval_windows  # noqa: E402
from ckptmerge.data.tokens import load_tokens  # noqa: E402
from ckptmerge.errors import ConfigError  # noqa: E402
from ckptmerge.evaluation.evaluator import evaluate_model, load_model  # noqa: E402
from ckptmerge.recovery.recover import RecoverConfig, recover  # noqa: E402
from ckptmerge.recovery.spikes import SmoothedRise, detect_spikes, first_smoothed_rise  # noqa: E402
from ckptmerge.sweep.run import SweepConfig, sweep  # noqa: E402
from ckptmerge.train.checkpointing import checkpoint_name  # noqa: E402
from ckptmerge.train.trainer import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_word_corpus(root)
    config = TrainConfig(preset="tiny", steps=40, lr=1e-2, warmup_steps=2, batch_size=8, context=32, save_every=5,
                         data=str(root / "train.txt"), seed=3, log_every=1)
    train(config, root / "stable", progress=False)
    anneal = TrainConfig(**{**config.__dict__, "schedule": "wsd", "decay_steps": 10,
                            "fork_from": str(root / "stable" / checkpoint_name(30))})
    train(anneal, root / "anneal", progress=False)
    return root


def _loss_of_numpy_average(root, steps, data):
    """Independent reference: fp64 NumPy average of the safetensors files, loaded into a fresh model."""
    files = [load_file(root / "stable" / checkpoint_name(s) / "model.safetensors") for s in steps]
    avg = {k: torch.from_numpy(sum(f[k].double().numpy() for f in files) / len(files)).float() for k in files[-1]}
    model = load_model(root / "stable" / checkpoint_name(steps[-1]))
    model.load_state_dict(avg, strict=False)
    context = model.config.max_position_embeddings  # the sweep's default context: the model's own
    return evaluate_model(model, eval_windows(load_tokens(data), n_tokens=1024, context=context)).loss


def test_sweep_numbers_match_an_independent_average_and_reruns_hit_the_cache(runs, tmp_path):
    data = str(runs / "val.txt")
    cfg = SweepConfig(methods=["sma", "ema:alpha=0.5"], n=[2, 3], every=[5, 10], at=[20, 40], data=[data], n_tokens=1024)
    report = sweep(runs / "stable", cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    row = next(r for r in report["rows"] if r["recipe"] == "sma N=3 V=10" and r["step"] == 40)
    assert row["loss"][data] == pytest.approx(_loss_of_numpy_average(runs, [20, 30, 40], data), abs=2e-5)
    raw = next(r for r in report["rows"] if r["recipe"] == "raw" and r["step"] == 40)
    assert row["vs_raw"][data][0] == pytest.approx(row["loss"][data] - raw["loss"][data], abs=1e-9)
    assert not any(r["step"] == 20 and r["recipe"] == "sma N=3 V=10" for r in report["rows"])  # no window at 20
    assert [r["step"] for r in report["anneal"]["anneal"]] == [35, 40]  # the fork was found automatically
    for name in ("report.md", "loss_vs_step.png", "gain_n_v.png", "methods.png", "anneal_prediction.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    scored = report["cache"]["scored"]
    again = sweep(runs / "stable", cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    assert again["cache"]["scored"] == 0 and again["cache"]["hits"] >= scored
    assert again["rows"] == report["rows"]


def test_sweep_refuses_to_write_into_the_run(runs):
    with pytest.raises(ConfigError, match="inside the run"):
        sweep(runs / "stable", SweepConfig(), runs / "stable" / "sweep", progress=False)


def test_spike_detector_finds_injected_spikes_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    records = [{"step": s, "loss": 2.0 - 0.001 * s + 0.03 * rng.standard_normal(), "grad_norm": 0.5 + 0.05 * rng.random()}
               for s in range(1, 301)]
    assert detect_spikes(records) == []
    records[149]["loss"] += 1.0          # step 150: a loss jump lasting two steps
    records[150]["loss"] += 0.8
    records[219]["grad_norm"] = 9.0      # step 220: a grad-norm explosion alone
    found = detect_spikes(records)
    assert [s.step for s in found] == [150, 220]
    assert "loss" in found[0].reason and "grad norm" in found[1].reason


def _first_rise_reference(losses: np.ndarray, smooth: int, rise: float) -> int | None:
    """fp64 NumPy: the first step whose trailing mean exceeds the minimum of the earlier trailing means + rise."""
    means = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")  # means[i] ends at step i + smooth
    for i in range(1, len(means)):
        if means[i] > means[:i].min() + rise:
            return i + smooth
    return None


def test_smoothed_rise_fires_where_the_numpy_reference_does_and_survives_a_restart():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 301)
    calm = 3.0 - 0.003 * steps + 0.05 * rng.standard_normal(300)
    rising = calm + np.where(steps > 180, 0.04 * (steps - 180), 0.0)  # a slow climb from step 181
    expected = _first_rise_reference(rising, 10, 0.5)
    assert _first_rise_reference(calm, 10, 0.5) is None and expected is not None and expected > 190
    whole = SmoothedRise(10, 0.5)
    assert [s for s, x in zip(steps, calm) if whole.update(int(s), float(x))] == []
    first, resumed = SmoothedRise(10, 0.5), SmoothedRise(10, 0.5)
    fired = [s for s, x in zip(steps[:150], rising[:150]) if first.update(int(s), float(x))]
    resumed.load_state_dict(first.state_dict())   # a restart at step 150, mid-window
    fired += [s for s, x in zip(steps[150:], rising[150:]) if resumed.update(int(s), float(x))]
    assert fired == [expected] and resumed.fired_step == expected
    spike = first_smoothed_rise([{"step": int(s), "loss": float(x)} for s, x in zip(steps, rising)])
    assert spike is not None and spike.step == expected and "running minimum" in spike.reason


def test_smoothed_rise_fires_on_a_non_finite_loss_once_a_window_has_filled():
    early, late = SmoothedRise(10, 0.5), SmoothedRise(10, 0.5)
    assert not early.update(1, float("nan"))  # no minimum yet: nothing to rise above
    assert not any(late.update(s, 2.0) for s in range(1, 31))
    assert late.update(31, float("inf")) and late.fired_step == 31


def test_recover_restarts_from_the_numpy_average_of_pre_spike_checkpoints(runs, tmp_path):
    cfg = RecoverConfig(n=3, spike_step=27, steps=30, baseline=True, optimizer_state="keep")
    result = recover(runs / "stable", cfg, tmp_path / "rec", progress=False, log=lambda *_: None)
    assert [os.path.basename(p) for p in result.merged_from] == [checkpoint_name(s) for s in (15, 20, 25)]
    files = [load_file(runs / "stable" / checkpoint_name(s) / "model.safetensors") for s in (15, 20, 25)]
    merged = load_file(tmp_path / "rec" / "merged" / "model.safetensors")
    for k, v in merged.items():
        want = sum(f[k].double().numpy() for f in files) / 3
        np.testing.assert_allclose(v.double().numpy(), want, rtol=1e-6, atol=1e-7)
    run_config = json.loads((tmp_path / "rec" / "restart-merged" / "run.json").read_text())
    assert run_config["init_from"].endswith("merged") and run_config["fork_from"].endswith(checkpoint_name(25))
    assert run_config["optimizer_state"] == "keep"

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open())}

    original, last, merged_run = losses(runs / "stable"), losses(tmp_path / "rec" / "restart-last"), \
        losses(tmp_path / "rec" / "restart-merged")
    assert sorted(last) == [26, 27, 28, 29, 30]
    # same weights, Adam state and batches: the unmerged restart replays the original run
    assert [last[s] for s in last] == pytest.approx([original[s] for s in last], rel=1e-5)
    assert merged_run[26] != pytest.approx(original[26], rel=1e-4)  # the merged restart really starts elsewhere
    assert set(result.spikes_after) == {"restart-merged", "restart-last"}
