"""A run directory holding only a layout ckptmerge knows but cannot read: the error names the layout and the fix."""

from __future__ import annotations

import pytest
import torch
from trainer_checks import run_cli

CASES = [
    ("global_step10/mp_rank_01_model_states.pt", "DeepSpeed tensor parallel", "ds_to_universal.py"),
    ("global_step10/layer_01-model_states.pt", "DeepSpeed pipeline parallel", "ds_to_universal.py"),
    ("iter_0000010/mp_rank_00/model_optim_rng.pt", "Megatron legacy", "torch_dist"),
    ("step_10/pytorch_model_fsdp_0_rank0.bin", "FSDP per-rank files", "SHARDED_STATE_DICT"),
]


@pytest.mark.parametrize(("file", "layout", "fix"), CASES, ids=[c[1] for c in CASES])
def test_no_checkpoints_error_names_the_unreadable_layout(tmp_path, capsys, file, layout, fix):
    (tmp_path / file).parent.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, tmp_path / file)
    for command in (("inspect", tmp_path), ("merge", tmp_path, "-o", tmp_path / "out", "--quiet")):
        code, _ = run_cli(*command)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "no checkpoints found" in err and layout in err and fix in err and file.split("/")[0] in err
    assert not (tmp_path / "out").exists()
