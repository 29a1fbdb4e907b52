"""Lightning ``ModelParallelStrategy`` (FSDP2) on 2 gloo ranks: sharded ``epoch=E-step=S.ckpt/`` DCP folders.

The reference is Lightning's own consolidation (``_load_distributed_checkpoint``, what
``python -m lightning.fabric.utilities.consolidate_checkpoint`` runs); the merge must carry the model's own
names (``0.weight``), not ``state_dict.model.0.weight``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_checks import assert_merge_matches, fp64_mean, merged_tensors, run_cli

pytest.importorskip("lightning", reason="lightning is a test extra")
SCRIPT = Path(__file__).parent / "trainer_scripts" / "lightning_sharded_run.py"
STEPS = [2, 4, 6, 8]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lightning_sharded")
    done = subprocess.run([sys.executable, str(SCRIPT), str(run_dir)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MASTER_PORT="29631"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints"


def _consolidated(folder: Path) -> dict[str, torch.Tensor]:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(folder)["state_dict"]


def _folder(run: Path, step: int) -> Path:
    return next(run.glob(f"epoch=*-step={step}.ckpt"))


def test_sharded_lightning_run_merges_with_the_models_names(sharded_run, tmp_path):
    reference = fp64_mean([_consolidated(_folder(sharded_run, s)) for s in STEPS[1:]])
    assert sorted(reference) == ["model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight"]
    assert_merge_matches(sharded_run, tmp_path / "out", reference, STEPS, "lightning",
                         key_map=lambda k: k.removeprefix("model."))


def test_sharded_hand_back_is_read_by_lightnings_loader(sharded_run, tmp_path):
    out = tmp_path / "merged"
    code, _ = run_cli("merge", sharded_run, "-o", out, "--last", "3", "--as-checkpoint", "--quiet")
    assert code == 0
    merged = merged_tensors(out)
    handed_back = _consolidated(out / _folder(sharded_run, 8).name)
    newest = _consolidated(_folder(sharded_run, 8))
    for name, tensor in merged.items():
        torch.testing.assert_close(handed_back["model." + name], tensor, rtol=0, atol=0)
        assert not torch.equal(newest["model." + name], tensor)  # the hand-back holds the merge, not the newest
