"""A reproduction run cut off and resumed ends exactly as the run trained in one go (weights, log, spike)."""

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
