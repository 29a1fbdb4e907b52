"""HF Trainer / accelerate FSDP checkpoints: ``checkpoint-N/pytorch_model_fsdp_0/`` (SHARDED_STATE_DICT) and
``checkpoint-N/pytorch_model_fsdp.bin`` (FULL_STATE_DICT) beside ``trainer_state.json``.

The folders are written with the calls accelerate's ``save_fsdp_model`` makes (``dcp.save({"model": sd},
storage_writer=FileSystemWriter(ckpt_dir))``; ``torch.save(sd, ...)`` for the full state dict), on one process:
the HF Trainer under FSDP needs an accelerator. The reference is torch's own ``dcp_to_torch_save``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer_checks import assert_merge_matches, fp64_mean, merged_tensors, run_cli


def _write_run(run, variant):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(1, 41):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 10:
            continue
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        if variant == "sharded":
            dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(folder / "pytorch_model_fsdp_0"))
            dcp.save({"optimizer": opt.state_dict()}, storage_writer=dcp.FileSystemWriter(folder / "optimizer_0"))
        else:
            torch.save(model.state_dict(), folder / "pytorch_model_fsdp.bin")


def _consolidated(folder, variant, tmp_path):
    if variant == "full":
        return torch.load(folder / "pytorch_model_fsdp.bin")
    dcp_to_torch_save(folder / "pytorch_model_fsdp_0", tmp_path / f"{folder.name}.pt")  # torch's own tool
    return torch.load(tmp_path / f"{folder.name}.pt")["model"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("variant", ["sharded", "full"])
def test_hf_fsdp_checkpoints_merge_and_hand_back(tmp_path, variant):
    run = tmp_path / "run"
    _write_run(run, variant)
    reference = fp64_mean([_consolidated(run / f"checkpoint-{s}", variant, tmp_path) for s in (20, 30, 40)])
    assert_merge_matches(run, tmp_path / "out", reference, [10, 20, 30, 40], "hf-trainer")
    code, _ = run_cli("merge", run, "-o", tmp_path / "back", "--last", "3", "--as-checkpoint", "--quiet")
    assert code == 0
    handed_back = _consolidated(tmp_path / "back", variant, tmp_path / "out")
    for name, tensor in merged_tensors(tmp_path / "back").items():
        torch.testing.assert_close(handed_back[name], tensor, rtol=0, atol=0)
    if variant == "sharded":
        assert (tmp_path / "back" / "optimizer_0" / ".metadata").is_file()
