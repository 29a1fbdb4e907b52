"""Reproduction runs: a run cut off and resumed ends exactly as the run trained in one go (weights, log, spike);
a fork state is the optimizer state of its own step; the per-step EMA is the fp64 reference EMA."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ckptmerge.reproduce import training
from ckptmerge.reproduce.training import RunSpec, load_trajectory, train_run

pytest.importorskip("transformers")


def _spec(name: str) -> RunSpec:
    # warm-up to an LR far too high, clipping off: the loss spikes at step 79 on this seed, after the cut at 50
    return RunSpec(name=name, lr=0.3, steps=120, schedule="constant", warmup=90, seed=0, batch_size=2, context=16,
                   grad_clip=0.0, snap_steps=tuple(range(10, 121, 10)), state_steps=(60,), ema_decays=(0.9,),
                   watch_spikes=True, post_spike_steps=1000)


class Cut(Exception):
    pass


def test_cut_and_resumed_run_equals_the_run_in_one_go(tmp_path, monkeypatch):
    train_run(_spec("run"), tmp_path / "whole")
    save = training._save_resume

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Cut  # killed right after the resume file of step 50 landed

    monkeypatch.setattr(training, "_save_resume", save_then_die)
    with pytest.raises(Cut):
        train_run(_spec("run"), tmp_path / "cut")
    monkeypatch.setattr(training, "_save_resume", save)
    assert (tmp_path / "cut" / "run" / training.RESUME).is_file()
    train_run(_spec("run"), tmp_path / "cut")

    whole, resumed = load_trajectory(tmp_path / "whole", "run"), load_trajectory(tmp_path / "cut", "run")
    assert whole.spike_step is not None and whole.spike_step > 50  # the detector's window spans the cut
    assert resumed.log == whole.log
    assert (resumed.spike_step, resumed.diverged, resumed.final_step) == (whole.spike_step, whole.diverged,
                                                                          whole.final_step)
    assert resumed.snaps.keys() == whole.snaps.keys() and resumed.states.keys() == whole.states.keys()
    for step, flat in whole.snaps.items():
        assert torch.equal(resumed.snaps[step], flat)
        assert torch.equal(resumed.emas[0.9][step], whole.emas[0.9][step])
    for step, state in whole.states.items():
        assert torch.equal(resumed.states[step]["weights"], state["weights"])


def test_fork_state_holds_the_optimizer_state_of_its_own_step(tmp_path):
    # reference: a run that ends at the fork step, whose optimizer is not stepped after the state is taken
    short = RunSpec(name="short", lr=4e-3, steps=30, schedule="constant", warmup=5, seed=1, batch_size=2, context=16,
                    state_steps=(30,))
    train_run(short, tmp_path)
    train_run(replace(short, name="long", steps=60), tmp_path)
    ended, forked = load_trajectory(tmp_path, "short").states[30], load_trajectory(tmp_path, "long").states[30]
    assert torch.equal(forked["weights"], ended["weights"])
    assert ended["optimizer"]["state"].keys() == forked["optimizer"]["state"].keys()
    for key, moments in ended["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(forked["optimizer"]["state"][key][name], moments[name]), (key, name)


def test_per_step_ema_matches_an_fp64_reference_seeded_with_the_initial_weights(tmp_path):
    from ckptmerge.train.presets import build_model

    decay, steps = 0.9, 12
    spec = RunSpec(name="ema", lr=4e-3, steps=steps, schedule="constant", warmup=5, seed=2, batch_size=2, context=16,
                   snap_steps=tuple(range(1, steps + 1)), ema_decays=(decay,))
    train_run(spec, tmp_path)
    traj = load_trajectory(tmp_path, "ema")
    reference = torch.nn.utils.parameters_to_vector(build_model("tiny", 2).parameters()).detach().double().numpy()
    for step in range(1, steps + 1):
        reference = decay * reference + (1 - decay) * traj.snaps[step].double().numpy()
        assert np.abs(traj.emas[decay][step].double().numpy() - reference).max() < 2e-6, step


def test_spike_design_surges_the_lr_at_the_same_steps_in_the_spike_run_and_its_restarts():
    from ckptmerge.reproduce.design import restart_specs, spike_spec
    from ckptmerge.reproduce.scale import make_scale

    for name in ("test", "quick", "full"):
        s = make_scale(name)
        first, n, factor = s.spike_surge
        assert n >= 5 and factor == s.spike_lr_factor and first == round(0.6 * s.spike_steps)
        spike = spike_spec(s, 2e-3, 0)
        assert spike.grad_clip == 0.0 and spike.surge == s.spike_surge
        lr = spike.train_config().lr_schedule()
        assert [lr(t) for t in (first - 1, first, first + n - 1, first + n)] == pytest.approx(
            [2e-3, factor * 2e-3, factor * 2e-3, 2e-3])
        for runs in restart_specs(s, spike, first + 3).values():
            for restart in runs:
                assert restart.surge == spike.surge and restart.grad_clip == 0.0
                relr = restart.train_config().lr_schedule()
                assert [relr(t) for t in range(first - 2, first + n + 2)] == [lr(t) for t in range(first - 2,
                                                                                              first + n + 2)]
    # no surge: the trainer's own config, unchanged
    assert type(_spec("plain").train_config()).__name__ == "TrainConfig"
