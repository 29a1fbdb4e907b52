"""torchtitan-style DCP run (model FQNs at the top level + optimizer / train_state) resumed from the merge.

torchtitan itself is not installed (its dependencies are heavy for CI); its CheckpointManager saves
``dcp.save({**model_sd, "optimizer": ..., "train_state": ...})`` with the state dicts of
``torch.distributed.checkpoint.state_dict.get_state_dict``, which is what this test does.
"""

from __future__ import annotations

import io

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer_checks import assert_merge_matches, fp64_mean, run_cli


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model, opt, step):
    model_sd, optim_sd = get_state_dict(model, opt)
    train_state = io.BytesIO()
    torch.save({"step": step}, train_state)
    return {**model_sd, "optimizer": optim_sd, "train_state": train_state}


def test_dcp_run_resumes_from_the_merge(tmp_path):
    run_dir = tmp_path / "checkpoint"
    model, opt = _model_and_opt()
    for step in range(1, 41):
        _step(model, opt, step)
        if step % 10 == 0:
            dcp.save(_state(model, opt, step), checkpoint_id=run_dir / f"step-{step}")

    def load(folder):  # torch DCP's own loader, as torchtitan resumes
        fresh, fresh_opt = _model_and_opt()
        _step(fresh, fresh_opt, 0)  # materialise the optimizer state to load into
        model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
        state = {**model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(fresh, fresh_opt, model_state_dict={k: state[k] for k in model_sd},
                       optim_state_dict=state["optimizer"])
        return fresh, fresh_opt

    reference = fp64_mean([load(run_dir / f"step-{s}")[0].state_dict() for s in (20, 30, 40)])
    assert_merge_matches(run_dir, tmp_path / "plain", reference, [10, 20, 30, 40], "torchtitan/dcp")
    code, _ = run_cli("merge", run_dir, "-o", tmp_path / "out", "--last", "3", "--as-checkpoint", "--quiet")
    assert code == 0
    resumed, resumed_opt = load(tmp_path / "out" / "step-40")
    for name, want in reference.items():
        torch.testing.assert_close(resumed.state_dict()[name].double(), torch.from_numpy(want), rtol=0, atol=1e-5)
    _, newest_opt = load(run_dir / "step-40")
    for got, want in zip(resumed_opt.state.values(), newest_opt.state.values()):
        assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["step"], want["step"])
    _step(resumed, resumed_opt, 41)  # training continues from the merge
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
