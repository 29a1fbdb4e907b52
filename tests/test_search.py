"""Weight search on a tiny real series: pair vs a dense grid, never worse than baselines, resumable, parallel."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import write_word_corpus

optuna = pytest.importorskip("optuna")
pytest.importorskip("transformers")

from ckptmerge import discover  # noqa: E402
from ckptmerge.data.batches import PAD  # noqa: E402
from ckptmerge.errors import ConfigError, OutputExistsError  # noqa: E402
from ckptmerge.search.objective import MergeObjective  # noqa: E402
from ckptmerge.search.run import search  # noqa: E402
from ckptmerge.search.spaces import SimplexSpace  # noqa: E402
from ckptmerge.search.study import SearchConfig  # noqa: E402
from ckptmerge.train.trainer import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    write_word_corpus(root)
    config = TrainConfig(preset="tiny", steps=40, lr=1e-2, warmup_steps=2, batch_size=8, context=32, save_every=10,
                         data=str(root / "train.txt"), seed=1)
    train(config, root / "run", progress=False)
    return root, discover(root / "run").checkpoints


def test_stick_breaking_is_a_bijection_that_reaches_every_baseline():
    space = SimplexSpace(5)
    for name, params in space.baselines().items():
        coeffs = space.coeffs(params)
        assert sum(coeffs) == pytest.approx(1.0) and min(coeffs) >= 0
        assert space.coeffs(space.params_for(coeffs)) == pytest.approx(coeffs)
    assert space.coeffs(space.baselines()["newest"]) == pytest.approx([0, 0, 0, 0, 1])
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.dirichlet(np.ones(5)).tolist()
        assert space.coeffs(space.params_for(w)) == pytest.approx(w)


def test_pair_search_lands_within_noise_of_a_dense_grid(series):
    root, refs = series
    data = str(root / "val.txt")
    objective = MergeObjective(refs[-2:], n_tokens=2048)
    grid = np.linspace(0, 1, 21)
    grid_losses = [objective([1 - lam, lam], data).loss for lam in grid]
    cfg = SearchConfig(space="pair", data=data, trials=8, seed=0)
    result = search(refs, cfg, n_tokens=2048)
    assert len(result.trials) == 8 < len(grid)
    assert result.best_loss <= min(grid_losses) * 1.002  # within 0.2% of the grid optimum


def _reference_loss(refs, weights, windows: torch.Tensor) -> float:
    """Independent of ckptmerge's merge and evaluator: an fp64 NumPy weighted sum of the checkpoints'
    safetensors, loaded into transformers' own model, scored with torch's cross-entropy (PAD targets skipped)."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    states = [load_file(ref.path / "model.safetensors") for ref in refs]
    merged = {k: sum(np.float64(w) * s[k].astype(np.float64) for w, s in zip(weights, states)) for k in states[-1]}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(refs[-1].path)).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in merged.items()},
                                                strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied to the embedding
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            inputs, targets = row[:-1].clamp(min=0), row[1:]
            losses = torch.nn.functional.cross_entropy(model(inputs[None]).logits[0].double(), targets,
                                                       ignore_index=PAD, reduction="sum")
            total, count = total + float(losses), count + int((targets != PAD).sum())
    return total / count


def test_simplex_search_reports_its_best_trial_and_real_baselines(series, tmp_path):
    """The baselines ran at their schedules' weights (fp64 formulas), every reported loss is what an independent
    merge and evaluation give, and the reported best is the best trial of the study."""
    root, refs = series
    data = str(root / "val.txt")
    cfg = SearchConfig(space="simplex", data=data, trials=9, seed=0)
    result = search(refs, cfg, n_tokens=2048, output=tmp_path / "best", report_data=[str(root / "other.txt")])
    n, a = len(refs), 0.2
    ramp = np.arange(1, n + 1, dtype=np.float64)
    want = {"newest": np.eye(n)[-1], "uniform": np.full(n, 1 / n), "wma": ramp / ramp.sum(),
            "ema a=0.2": np.array([(1 - a) ** (n - 1)] + [a * (1 - a) ** (n - 1 - i) for i in range(1, n)])}
    baselines = {r["baseline"]: r for r in result.trials if r["baseline"]}
    assert set(baselines) == set(want)
    windows = MergeObjective(refs, n_tokens=2048).windows(data)
    for name, row in baselines.items():
        np.testing.assert_allclose(row["weights"], want[name], rtol=0, atol=1e-12)
        assert row["loss"] == pytest.approx(_reference_loss(refs, want[name], windows), rel=1e-5), name
    assert len(result.trials) == 9 and result.best_loss == min(r["loss"] for r in result.trials)
    assert result.best_loss == pytest.approx(_reference_loss(refs, result.best_weights, windows), rel=1e-5)
    assert (tmp_path / "best" / "merge.json").is_file()
    assert set(result.generalization) == {str(root / "val.txt"), str(root / "other.txt")}


def test_sqlite_study_resumes_its_trial_count(series, tmp_path):
    root, refs = series
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=4, storage=storage, study_name="s")
    search(refs, cfg, n_tokens=1024)
    cfg.trials = 7
    result = search(refs, cfg, n_tokens=1024)  # a new process would do the same: load_if_exists
    assert sorted(r["trial"] for r in result.trials) == list(range(7))
    assert sum(1 for r in result.trials if r["baseline"]) == 3  # baselines were not enqueued twice


def test_two_workers_share_one_sqlite_study_without_lost_or_duplicated_trials(series, tmp_path):
    """Workers that start together may both enqueue the baselines: made certain here by queueing every
    baseline twice before the workers start. Each baseline must still complete exactly once, every twin
    must be dropped (FAIL), and no trial may be lost or run at a point another trial already ran."""
    from ckptmerge.search.study import open_study

    root, refs = series
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = SearchConfig(space="simplex", data=str(root / "val.txt"), trials=8, storage=storage, study_name="p",
                       sampler="random")
    space = SimplexSpace(len(refs))
    first = open_study(cfg, space)
    for name, params in space.baselines().items():  # the second worker's copies
        first.enqueue_trial(params, user_attrs={"baseline": name})
    result = search(refs, cfg, n_tokens=1024, workers=2)

    trials = optuna.load_study(study_name="p", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    dropped = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in trials] == list(range(len(trials)))
    evaluated = [t for t in complete if t.user_attrs.get("repeat_of") is None]  # repeats are answered, not run
    assert 8 <= len(evaluated) <= 9  # two workers may both start the 8th
    assert sorted(t.user_attrs["baseline"] for t in complete if t.user_attrs.get("baseline")) == \
        sorted(space.baselines())
    assert all(t.state == optuna.trial.TrialState.FAIL for t in dropped)
    assert sorted(t.user_attrs["baseline"] for t in dropped) == sorted(space.baselines())
    assert min(t.number for t in dropped) > max(t.number for t in complete if t.user_attrs.get("baseline"))
    points = [tuple(round(v, 12) for v in t.user_attrs["coeffs"]) for t in evaluated]
    by_number = {t.number: t for t in trials}
    for t in complete:
        if t.user_attrs.get("repeat_of") is not None:  # a repeat carries its twin's point and value
            twin = by_number[t.user_attrs["repeat_of"]]
            assert t.value == twin.value and np.allclose(t.user_attrs["coeffs"], twin.user_attrs["coeffs"], atol=1e-6)
    assert len(set(points)) == len(points)
    assert sorted(r["trial"] for r in result.trials) == [t.number for t in complete]


def test_gp_display_fit_interpolates_its_observations_and_widens_between_them():
    from ckptmerge.search.plots import gp_posterior

    x = np.array([0.0, 0.3, 0.5, 0.9, 1.0])
    y = np.array([2.0, 1.7, 1.65, 1.8, 1.9])
    mean, sd = gp_posterior(x, y, x)
    np.testing.assert_allclose(mean, y, atol=1e-3)
    assert sd.max() < 1e-2
    _, sd_between = gp_posterior(x, y, np.array([0.7]))
    assert sd_between[0] > sd.max()


def test_search_writes_plots(series, tmp_path):
    root, refs = series
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=5)
    search(refs, cfg, n_tokens=1024, plots=tmp_path / "plots")
    assert (tmp_path / "plots" / "loss_vs_lambda.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "best_weights.png").stat().st_size > 5000


def test_gp_hedge_finds_the_minimum_of_a_known_curve_and_uses_its_portfolio():
    from ckptmerge.search.gp_hedge import GPHedgeSampler

    sampler = GPHedgeSampler(seed=0, n_startup_trials=3)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    study.optimize(lambda t: (t.suggest_float("lam", 0.0, 1.0) - 0.37) ** 2 + 1.0, n_trials=15)
    assert abs(study.best_params["lam"] - 0.37) < 0.02
    assert len(sampler.chosen) == 12 and set(sampler.chosen) <= {"ei", "pi", "ucb"}
    assert np.isfinite(sampler.gains).all()


def test_gp_hedge_drives_a_pair_search(series):
    root, refs = series
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=7, sampler="gp-hedge")
    result = search(refs, cfg, n_tokens=1024)
    assert len(result.trials) == 7 and sum(1 for r in result.trials if r["baseline"]) == 3
    windows = MergeObjective(refs[-2:], n_tokens=1024).windows(cfg.data)
    assert result.best_loss == pytest.approx(_reference_loss(refs[-2:], result.best_weights, windows), rel=1e-5)
    assert result.best_loss == min(r["loss"] for r in result.trials)


def test_stopped_evaluation_equals_the_first_windows_of_the_full_one(series):
    root, refs = series
    objective = MergeObjective(refs[-2:], n_tokens=4096, batch_size=8)
    full = objective([0.5, 0.5], str(root / "val.txt"))
    head = objective([0.5, 0.5], str(root / "val.txt"), stop=lambda mean, batches: batches == 2)
    assert len(head.window_losses) == 16 < len(full.window_losses)
    np.testing.assert_allclose(head.window_losses, full.window_losses[:16], rtol=1e-6)


def test_pruning_stops_clearly_worse_trials_and_keeps_the_best(series):
    root, refs = series
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=12, sampler="random", seed=3,
                       prune_after=1, prune_margin=0.0)
    result = search(refs, cfg, n_tokens=8192)  # 64 windows: 4 batches, pruning looks after the first
    study_rows = result.trials
    assert len(study_rows) < 12  # some trials were pruned (only complete trials are listed)
    baselines = [r["loss"] for r in study_rows if r["baseline"]]
    assert len(baselines) == 3 and result.best_loss == min(r["loss"] for r in study_rows)
    windows = MergeObjective(refs[-2:], n_tokens=8192).windows(cfg.data)  # a full evaluation, never a pruned head
    assert result.best_loss == pytest.approx(_reference_loss(refs[-2:], result.best_weights, windows), rel=1e-5)


def test_objective_holds_file_backed_views_and_matches_a_file_merge(series, tmp_path):
    from ckptmerge import compute_coeffs, merge

    root, refs = series
    window = refs[-3:]
    objective = MergeObjective(window, n_tokens=1024)  # holds mmap views of the checkpoints
    coeffs = compute_coeffs("wma", window)
    merge(window, coeffs, tmp_path / "m", progress=False)
    from ckptmerge.evaluation.evaluator import evaluate_model, load_model

    want = evaluate_model(load_model(tmp_path / "m"), objective.windows(str(root / "val.txt"))).loss
    assert objective(coeffs, str(root / "val.txt")).loss == pytest.approx(want, rel=1e-6)


def test_search_refuses_an_existing_output_before_any_trial(series, tmp_path):
    root, refs = series
    out = tmp_path / "best"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=3, storage=storage, study_name="o")
    with pytest.raises(OutputExistsError, match="--force"):
        search(refs, cfg, n_tokens=1024, output=out)
    assert (out / "keep.txt").read_text() == "mine"
    assert "o" not in optuna.get_all_study_names(storage)  # refused before the study was even opened
    result = search(refs, cfg, n_tokens=1024, output=out, force=True)
    assert not (out / "keep.txt").exists() and len(result.trials) == 3
    assert json.loads((out / "merge.json").read_text())["recipe"]["weights"] == result.best_weights


def test_search_cli_refuses_an_existing_output_in_one_line(series, tmp_path, capsys):
    from ckptmerge.cli.main import main

    root, refs = series
    out = tmp_path / "best"
    out.mkdir()
    code = main(["search", *[str(r.path) for r in refs[-2:]], "--data", str(root / "val.txt"), "--trials", "3",
                 "--tokens", "1024", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "trial" not in captured.out
    assert captured.err.count("\n") == 1 and str(out) in captured.err and "--force" in captured.err


def test_search_leaves_the_callers_config_alone(series, monkeypatch):
    """Two workers without --storage get a temporary SQLite study: on a copy of the config, never the caller's."""
    import ckptmerge.search.run as search_run

    def workers_in_this_process(refs, cfg, n_tokens, workers, settings=None):
        search_run._worker([str(r.path) for r in refs], cfg, n_tokens, torch.get_num_threads(), settings)

    monkeypatch.setattr(search_run, "_run_workers", workers_in_this_process)
    root, refs = series
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=3)
    before = copy.deepcopy(cfg)
    result = search(refs, cfg, n_tokens=1024, workers=2)
    assert len(result.trials) == 3
    assert cfg == before


def test_an_unknown_objective_is_refused_before_any_trial(series, tmp_path):
    root, refs = series
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = SearchConfig(space="pair", data=str(root / "val.txt"), trials=3, storage=storage, study_name="m",
                       objective="bpb")
    with pytest.raises(ConfigError, match="bpb.*loss, bits_per_byte"):
        search(refs, cfg, n_tokens=1024)
    assert "m" not in optuna.get_all_study_names(storage)
