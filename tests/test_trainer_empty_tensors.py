"""Empty tensors (ZeRO-3 placeholders, zero-width layers) merge in every format, copied as empty.

They sit first, in the middle and last in each file: before the fix, an empty tensor written after its
shard's last byte failed with "written again after it was finished".
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

from trainer_checks import fp64_mean, merged_tensors, run_cli


def _state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"a.empty": torch.zeros(0), "b.weight": torch.randn(4, 3, generator=g), "c.empty": torch.zeros(3, 0),
            "d.bias": torch.randn(5, generator=g), "e.count": torch.tensor([step, 2 * step]),
            "f.int_empty": torch.zeros(0, dtype=torch.int64), "g.weight": torch.randn(2, 2, generator=g),
            "z.empty": torch.zeros(0, 7)}


def _save_safetensors(run, step, state):
    (run / f"step_{step}").mkdir(parents=True)
    safetensors.torch.save_file(state, run / f"step_{step}" / "model.safetensors")


def _save_torch(run, step, state):
    run.mkdir(exist_ok=True)
    torch.save({"model": state, "step": step}, run / f"model_{step}.pt")


def _save_dcp(run, step, state):
    dcp.save({"model": state}, checkpoint_id=run / f"step-{step}")


@pytest.mark.parametrize("save", [_save_safetensors, _save_torch, _save_dcp], ids=["safetensors", "torch", "dcp"])
@pytest.mark.parametrize("max_shard", [None, "40B"], ids=["one-file", "sharded"])
def test_empty_tensors_anywhere_are_copied_as_empty(tmp_path, save, max_shard):
    run = tmp_path / "run"
    states = [_state(step) for step in (10, 20, 30, 40)]
    for step, state in zip((10, 20, 30, 40), states):
        save(run, step, state)
    shard_flags = ["--max-shard-size", max_shard] if max_shard else []
    code, _ = run_cli("merge", run, "-o", tmp_path / "out", "--last", "3", "--schedule", "sma", "--quiet", *shard_flags)
    assert code == 0
    merged = merged_tensors(tmp_path / "out")
    assert sorted(merged) == sorted(states[-1])
    for name, want in fp64_mean(states[1:]).items():
        assert tuple(merged[name].shape) == want.shape, name
        torch.testing.assert_close(merged[name].double(), torch.from_numpy(want), rtol=0, atol=1e-6)
    assert merged["f.int_empty"].shape == (0,) and merged["f.int_empty"].dtype == torch.int64
    assert torch.equal(merged["e.count"], states[-1]["e.count"])  # integers: copied from the newest
