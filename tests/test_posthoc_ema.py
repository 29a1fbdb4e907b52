"""Power-function EMA (online), phema snapshots and the post-hoc EMA, against fp64 NumPy written here.

The references below are written from EDM2's maths (Karras et al. 2024, section 3 and appendix C), not from
ckptmerge's code: the profile width by bisection, the snapshot weights in closed form, and the least-squares
solve by ``np.linalg.solve`` on inner products integrated by hand.
"""

import json
import math

import numpy as np
import pytest
import torch

from ckptmerge.cli.main import main as cli
from ckptmerge.errors import ConfigError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.discover import discover
from ckptmerge.merging.method_spec import parse_method
from ckptmerge.online import parse_average_spec
from ckptmerge.online.phema import PowerEMASnapshots
from ckptmerge.online.rules import PowerEMA


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(13, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 13)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.embed(x))))


def batch(generator):
    x = torch.randint(0, 13, (16, 6), generator=generator)
    return x, (x * 3 + 1) % 13  # a fixed map to learn; noisy SGD makes the averages differ


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def trajectory(steps, seed=0):
    """(step, model) after each SGD step of a tiny, noisy run."""
    torch.manual_seed(seed)
    model, generator = Tiny(), torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, steps + 1):
        x, y = batch(generator)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        yield step, model


def flat(tensors: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in names])


# --- independent fp64 references -------------------------------------------------------------------------------
def ref_gamma(sigma_rel):
    """gamma with sigma_rel(gamma) = sqrt((g+1) / ((g+2)^2 (g+3))) = sigma_rel, by bisection (it decreases in g)."""
    width = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    lo, hi = 1e-9, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def ref_power_ema_weights(steps_seen, gamma):
    """Weights of the power EMA at the last step on the weights of each step seen (every step from 1)."""
    t = steps_seen[-1]
    s = np.asarray(steps_seen, dtype=np.float64)
    return (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t ** (gamma + 1)


def ref_edm2_solve(steps, gammas, target_step, target_gamma):
    """EDM2's post-hoc solve: A x = b with A_ij = int p_i p_j, p_(t, g)(tau) = (g+1) tau^g / t^(g+1) on [0, t]."""
    def inner(t1, g1, t2, g2):
        end = min(t1, t2)  # int_0^end (g1+1)(g2+1) tau^(g1+g2) / (t1^(g1+1) t2^(g2+1)) dtau
        return (g1 + 1) * (g2 + 1) * end ** (g1 + g2 + 1) / ((g1 + g2 + 1) * t1 ** (g1 + 1) * t2 ** (g2 + 1))

    n = len(steps)
    a = np.array([[inner(steps[i], gammas[i], steps[j], gammas[j]) for j in range(n)] for i in range(n)])
    b = np.array([inner(steps[i], gammas[i], target_step, target_gamma) for i in range(n)])
    return np.linalg.solve(a, b)


# --- the online rule --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_power_ema_equals_the_closed_form_weights(sigma_rel):
    ema = PowerEMA(sigma_rel)
    assert ema.gamma == pytest.approx(ref_gamma(sigma_rel), rel=1e-9)
    history = []
    for step, model in trajectory(40):
        ema.update(model, step)
        history.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    weights = ref_power_ema_weights(list(range(1, 41)), ref_gamma(sigma_rel))
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    for name, value in ema.averaged_state_dict().items():
        expected = sum(w * h[name] for w, h in zip(weights, history))
        np.testing.assert_allclose(value.double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_power_ema_by_gamma_equals_by_sigma_rel_and_resumes_exactly():
    whole, by_gamma = PowerEMA(0.1), PowerEMA(gamma=ref_gamma(0.1))
    first, resumed = PowerEMA(0.1), PowerEMA(0.1)
    for step, model in trajectory(20):
        whole.update(model, step)
        by_gamma.update(model, step)
        if step <= 11:
            first.update(model, step)
            if step == 11:
                resumed.load_state_dict(first.state_dict())
        else:
            resumed.update(model, step)
    for name, value in whole.averaged_state_dict().items():
        assert torch.equal(value, resumed.averaged_state_dict()[name]), name
        torch.testing.assert_close(value, by_gamma.averaged_state_dict()[name], rtol=1e-6, atol=1e-7)


def test_average_specs_build_power_emas_and_refuse_mistakes_in_one_line():
    assert parse_average_spec("power_ema:sigma_rel=0.07").gamma == pytest.approx(ref_gamma(0.07), rel=1e-9)
    phema = parse_average_spec("phema:sigma_rel=0.05/0.10,every=25")
    assert [p.sigma_rel for p in phema.profiles] == [0.05, 0.10] and phema.every == 25
    for bad, words in [("power_ema:sigma_rel=0.4", "sigma_rel must be in"),
                       ("power_ema:sigma_rel=0.05,gamma=7", "exactly one of"),
                       ("phema:sigma_rel=0.05/0.10", "every=K"),
                       ("phema:sigma_rel=0.05/0.1x,every=5", "bad value for sigma_rel")]:
        with pytest.raises(ConfigError, match=words) as caught:
            parse_average_spec(bad)
        assert "\n" not in str(caught.value)


# --- snapshots, discovery and the post-hoc merge ---------------------------------------------------------------
STEPS, EVERY = 200, 25


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A run that saves phema snapshots (0.05, 0.10) every 25 steps and tracks 0.07 and 0.15 directly."""
    folder = tmp_path_factory.mktemp("phema-run")
    snapshots = PowerEMASnapshots((0.05, 0.10), every=EVERY)
    tracked = {0.07: PowerEMA(0.07), 0.15: PowerEMA(0.15)}
    for step, model in trajectory(STEPS):
        snapshots.update(model, step)
        for ema in tracked.values():
            ema.update(model, step)
        if snapshots.snapshot_due(step):
            snapshots.save_snapshots(folder / "phema", model)
    return folder, snapshots, tracked, model


def test_snapshots_are_a_series_discover_reads_with_step_and_gamma(phema_run):
    folder, snapshots, _, _ = phema_run
    refs = discover(folder / "phema").checkpoints
    assert len(refs) == 2 * STEPS // EVERY
    assert sorted({r.step for r in refs}) == list(range(EVERY, STEPS + 1, EVERY))
    assert sorted({round(r.ema_gamma, 6) for r in refs}) == sorted(round(ref_gamma(s), 6) for s in (0.05, 0.10))
    newest = [r for r in refs if r.step == STEPS]
    for ref in newest:  # the newest snapshot of each profile is that profile's average
        profile = next(p for p in snapshots.profiles if abs(p.gamma - ref.ema_gamma) < 1e-9)
        reader = open_checkpoint(ref.path)
        for name, value in profile.averaged_state_dict().items():
            assert torch.equal(reader.get(name), value), name
        meta = json.loads((ref.path / "ckptmerge.json").read_text())
        assert meta["step"] == STEPS and meta["averaged"]["kind"] == "power_ema"


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_posthoc_reconstruction_beats_both_stored_profiles(phema_run, tmp_path, sigma_rel):
    folder, snapshots, tracked, model = phema_run
    out = tmp_path / "posthoc"
    assert cli(["merge", str(folder / "phema"), "-o", str(out), "--schedule", f"phema:sigma_rel={sigma_rel}",
                "--quiet"]) == 0
    manifest = json.loads((out / "merge.json").read_text())
    inputs = manifest["inputs"]
    steps = [i["step"] for i in inputs]
    gammas = [ref_gamma(0.05) if "sigma_rel-0.050" in i["path"] else ref_gamma(0.10) for i in inputs]
    expected = ref_edm2_solve(steps, gammas, STEPS, ref_gamma(sigma_rel))
    np.testing.assert_allclose([i["coefficient"] for i in inputs], expected, rtol=1e-6, atol=1e-9)
    fit = manifest["recipe"]["posthoc_fit"]
    assert fit["coefficients"] == [i["coefficient"] for i in inputs]
    assert 0 < fit["relative_residual"] < 0.1 and any(c < 0 for c in fit["coefficients"])

    reader = open_checkpoint(out)
    names = sorted(reader.keys())
    merged = {n: reader.get(n) for n in names}
    truth = flat(tracked[sigma_rel].averaged_state_dict(), names)

    def distance(weights):
        return np.linalg.norm(flat(weights, names) - truth) / np.linalg.norm(truth)

    stored = [distance(p.averaged_state_dict()) for p in snapshots.profiles]
    assert distance(merged) < 0.5 * min(stored), (distance(merged), stored)

    x, y = batch(torch.Generator().manual_seed(1234))  # held out: a generator the run never used
    with torch.no_grad():
        with tracked[sigma_rel].swapped(model):
            tracked_loss = float(loss_of(model, x, y))
        model.load_state_dict({**model.state_dict(), **merged})  # the module fixture's model is spent anyway
        assert abs(float(loss_of(model, x, y)) - tracked_loss) < 0.005


def test_phema_schedule_refuses_plain_checkpoints_and_bad_widths(tmp_path, phema_run):
    from ckptmerge.errors import ScheduleError
    from ckptmerge.merging.checkpoint import CheckpointRef
    from ckptmerge.merging.schedules import compute_coeffs

    plain = [CheckpointRef(tmp_path / f"step-{s}", step=s) for s in (10, 20)]
    with pytest.raises(ScheduleError, match="power-EMA snapshots"):
        compute_coeffs("phema", plain, sigma_rel=0.07)
    for text, words in [("phema", "exactly one of"), ("phema:sigma_rel=0.5", "sigma_rel must be in"),
                        ("phema:sigma_rel=0.07,gamma=4", "exactly one of")]:
        with pytest.raises(ConfigError, match=words):
            parse_method(text)
    folder = phema_run[0]
    assert cli(["merge", str(folder / "phema"), "-o", str(tmp_path / "x"), "--schedule", "phema", "--quiet"]) != 0
    assert not (tmp_path / "x").exists()


def test_other_schedules_refuse_a_folder_of_several_profiles(phema_run, tmp_path):
    folder = phema_run[0]
    code = cli(["merge", str(folder / "phema"), "-o", str(tmp_path / "sma"), "--schedule", "sma:n=2", "--quiet"])
    assert code != 0 and not (tmp_path / "sma").exists()
    one_profile = sorted(str(p) for p in (folder / "phema").glob("sigma_rel-0.050-*"))[-2:]
    assert cli(["merge", *one_profile, "-o", str(tmp_path / "sma"), "--schedule", "sma", "--quiet"]) == 0


# --- ckptmerge train --average phema:... ---------------------------------------------------------------------------
def test_trainer_saves_phema_snapshots_that_resume_exactly(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from ckptmerge.train import loop as loop_mod
    from ckptmerge.train.trainer import TrainConfig, train

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    words = np.random.default_rng(0).choice(["the", "king", "doth", "speak", "and", "queen", "not", "so"], 6000)
    (tmp_path / "corpus.txt").write_text(" ".join(words) + "\n")
    config = TrainConfig(preset="tiny", steps=8, lr=3e-3, warmup_steps=2, batch_size=4, context=16, save_every=4,
                         data=str(tmp_path / "corpus.txt"), log_every=1, seed=3,
                         average=["phema:sigma_rel=0.05/0.10,every=4", "power_ema:sigma_rel=0.07"])
    train(config, tmp_path / "full", progress=False)
    refs = discover(tmp_path / "full" / "phema").checkpoints
    assert [r.step for r in refs] == [4, 4, 8, 8] and all(r.ema_gamma for r in refs)
    assert [r.step for r in discover(tmp_path / "full").checkpoints] == [4, 8]  # the series lives apart

    real_step = loop_mod.train_step

    def dying_step(cfg, state, tokens, lr):
        if state.step == 6:
            raise KeyboardInterrupt
        return real_step(cfg, state, tokens, lr)

    monkeypatch.setattr(loop_mod, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(loop_mod, "train_step", real_step)
    train(config, tmp_path / "killed", resume=True, progress=False)  # from step 4's checkpoint
    for ref in refs[-2:]:
        a, b = open_checkpoint(ref.path), open_checkpoint(tmp_path / "killed" / "phema" / ref.name)
        for name in a.keys():
            torch.testing.assert_close(a.get(name), b.get(name), rtol=1e-6, atol=1e-7)
    tracked = open_checkpoint(tmp_path / "full" / "step-000008" / "avg-power_ema")
    assert json.loads((tmp_path / "full" / "step-000008" / "avg-power_ema" / "ckptmerge.json").read_text()
                      )["averaged"]["gamma"] == pytest.approx(ref_gamma(0.07), rel=1e-9)
    assert cli(["merge", str(tmp_path / "full" / "phema"), "-o", str(tmp_path / "post"), "--schedule",
                "phema:sigma_rel=0.07", "--quiet"]) == 0
    assert set(open_checkpoint(tmp_path / "post").keys()) == set(tracked.keys())


def test_search_space_phema_maps_sigma_rel_to_the_edm2_solve(phema_run):
    from ckptmerge.search.spaces import make_space

    refs = discover(phema_run[0] / "phema").checkpoints
    space = make_space("phema", len(refs), refs=refs)
    steps, gammas = [r.step for r in refs], [r.ema_gamma for r in refs]
    np.testing.assert_allclose(space.coeffs({"sigma_rel": 0.12}), ref_edm2_solve(steps, gammas, STEPS, ref_gamma(0.12)),
                               rtol=1e-6, atol=1e-9)
    baselines = space.baselines()
    assert sorted(round(p["sigma_rel"], 9) for p in baselines.values()) == [0.05, 0.1]
    for params in baselines.values():  # a stored profile is its own newest snapshot
        coeffs = np.array(space.coeffs(params))
        newest = [i for i, r in enumerate(refs) if r.step == STEPS and abs(r.ema_gamma - ref_gamma(params["sigma_rel"]))
                  < 1e-6]
        expected = np.zeros(len(refs))
        expected[newest] = 1.0
        np.testing.assert_allclose(coeffs, expected, atol=1e-6)


def test_normalize_rescales_the_posthoc_coefficients_to_sum_one(phema_run, tmp_path):
    folder = phema_run[0]
    assert cli(["merge", str(folder / "phema"), "-o", str(tmp_path / "n"), "--schedule", "phema:sigma_rel=0.15",
                "--normalize", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "n" / "merge.json").read_text())
    solved = np.array(manifest["recipe"]["posthoc_fit"]["coefficients"])
    merged = np.array([i["coefficient"] for i in manifest["inputs"]])
    assert abs(solved.sum() - 1) > 1e-6  # the solve alone does not sum to one ...
    np.testing.assert_allclose(merged, solved / solved.sum(), rtol=1e-12)  # ... the merge's weights do


@pytest.mark.parametrize("make", [lambda: PowerEMA(0.07), lambda: PowerEMASnapshots((0.05, 0.10), every=4)])
def test_hf_callback_saves_and_resumes_power_emas(tmp_path, make):
    """The HF callback's hooks, called as Trainer calls them: a save at step 6, a new callback resumed from it."""
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from ckptmerge.online.hf_callback import AveragingCallback

    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    control = SimpleNamespace(should_log=False)
    whole, resumed = AveragingCallback(make()), None
    for step, model in trajectory(12):
        state = SimpleNamespace(global_step=step, num_input_tokens_seen=None)
        whole.on_step_end(args, state, control, model=model)
        if resumed is not None:
            resumed.on_step_end(args, state, control, model=model)
        if step == 6:
            whole.on_save(args, state, control, model=model)
            resumed = AveragingCallback(make())
            resumed.on_train_begin(args, state, control)
            assert resumed.averager.n_averaged == 6
    pairs = list(zip(getattr(whole.averager, "profiles", [whole.averager]),
                     getattr(resumed.averager, "profiles", [resumed.averager])))
    assert len(pairs) == len(getattr(whole.averager, "profiles", [None]))
    for a, b in pairs:  # every profile of a phema averager
        for name, value in a.averaged_state_dict().items():
            assert torch.equal(value, b.averaged_state_dict()[name]), name
    saved = json.loads((tmp_path / "checkpoint-6" / "averaged" / "ckptmerge.json").read_text())["averaged"]
    assert saved["kind"] == "power_ema" and saved["gamma"] == pytest.approx(ref_gamma(saved["sigma_rel"]), rel=1e-9)


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_callbacks_write_the_phema_snapshot_series(tmp_path, framework):
    """Through the callback's own hooks (Lightning's twice a step, as under gradient accumulation), a phema averager
    writes OUT/phema/ like ``train --average phema:...``: each snapshot is the closed-form power EMA of its step."""
    from types import SimpleNamespace

    if framework == "hf":
        pytest.importorskip("transformers")
        from ckptmerge.online.hf_callback import AveragingCallback

        args, control = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None), SimpleNamespace()

        def hook(callback, step, model):
            callback.on_step_end(args, SimpleNamespace(global_step=step, num_input_tokens_seen=None), control,
                                 model=model)
    else:
        pytest.importorskip("lightning")
        from ckptmerge.online.lightning_callback import AveragingCallback

        def hook(callback, step, model):
            trainer = SimpleNamespace(global_step=step, default_root_dir=str(tmp_path))
            for _ in range(2):  # two micro-batches of one optimizer step
                callback.on_train_batch_end(trainer, model, None, None, 0)

    callback = AveragingCallback(PowerEMASnapshots((0.05, 0.10), every=4))
    history = []
    for step, model in trajectory(12):
        hook(callback, step, model)
        history.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    refs = discover(tmp_path / "phema").checkpoints
    assert [r.step for r in refs] == [4, 4, 8, 8, 12, 12]
    for ref in refs:
        weights = ref_power_ema_weights(list(range(1, ref.step + 1)), ref.ema_gamma)
        assert ref.ema_gamma == pytest.approx(ref_gamma(0.05 if "0.050" in ref.name else 0.10), rel=1e-9)
        reader = open_checkpoint(ref.path)
        for name in history[0]:
            expected = sum(w * h[name] for w, h in zip(weights, history))
            np.testing.assert_allclose(reader.get(name).double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert cli(["merge", str(tmp_path / "phema"), "-o", str(tmp_path / "post"), "--schedule", "phema:sigma_rel=0.07",
                "--quiet"]) == 0
