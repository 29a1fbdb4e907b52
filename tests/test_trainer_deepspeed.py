"""DeepSpeed runs written by ``engine.save_checkpoint`` on CPU: ZeRO 0 fp32, ZeRO 1 fp32, ZeRO 2 bf16 on one rank;
ZeRO 3 fp32 and bf16 on one and two gloo ranks, checked against DeepSpeed's own ``zero_to_fp32``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_checks import assert_merge_matches

pytest.importorskip("deepspeed", reason="deepspeed is a test extra")
SCRIPT = Path(__file__).parent / "trainer_scripts" / "deepspeed_run.py"
CONFIGS = [(0, "fp32"), (1, "fp32"), (2, "bf16")]


ZERO3 = [(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]


def run_script(*args, port: int, world: int = 1) -> None:
    """The script on ``world`` gloo ranks, one process each."""
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)))
             for rank in range(world)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"zero{s}-{d}" for s, d in CONFIGS])
def deepspeed_run(request, tmp_path_factory):
    stage, dtype = request.param
    run_dir = tmp_path_factory.mktemp(f"ds{stage}{dtype}")
    run_script("train", run_dir, stage, dtype, port=29540 + stage)
    return run_dir, stage, dtype


def test_deepspeed_run_merges_with_true_steps(deepspeed_run, tmp_path):
    run_dir, _, _ = deepspeed_run
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").is_file()
    reference = {k: v.numpy() for k, v in torch.load(run_dir / "reference.pt").items()}
    assert_merge_matches(ckpts, tmp_path / "out", reference, [2, 4, 6, 8], "deepspeed")


def test_deepspeed_resumes_from_the_merge(deepspeed_run, tmp_path):
    import json

    from trainer_checks import run_cli

    run_dir, stage, dtype = deepspeed_run
    out = tmp_path / "merged"
    code, _ = run_cli("merge", run_dir / "checkpoints", "-o", out, "--last", "3", "--schedule", "sma",
                      "--as-checkpoint", "--quiet")
    assert code == 0 and (out / "latest").read_text() == "global_step8"
    run_script("resume", tmp_path, stage, dtype, out, "global_step8", port=29550 + stage)  # engine.load_checkpoint
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["step"] == 8 and resumed["after"] == 10 and np.isfinite(resumed["loss"])
    weights = torch.load(tmp_path / "resumed_weights.pt")
    reference = torch.load(run_dir / "reference.pt")
    atol = 1e-5 if dtype == "fp32" else 8e-3  # a bf16 run resumes with bf16 weights
    for name, want in reference.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=atol)


@pytest.fixture(scope="module", params=ZERO3, ids=[f"zero3-{w}rank-{d}" for w, d in ZERO3])
def zero3_run(request, tmp_path_factory):
    world, dtype = request.param
    run_dir = tmp_path_factory.mktemp(f"ds3{world}{dtype}")
    run_script("train", run_dir, 3, dtype, port=29560 + 2 * world + (dtype == "bf16"), world=world)
    return run_dir, world


def test_zero3_run_merges_the_fp32_masters(zero3_run, tmp_path):
    """The merge equals the fp64 mean of DeepSpeed's own zero_to_fp32 consolidation of the last three tags."""
    run_dir, world = zero3_run
    tag = run_dir / "checkpoints" / "global_step8"
    assert len(list(tag.glob("*zero_pp_rank_*_optim_states.pt"))) == world
    reference = {k: v.numpy() for k, v in torch.load(run_dir / "reference.pt").items()}
    assert_merge_matches(run_dir / "checkpoints", tmp_path / "out", reference, [2, 4, 6, 8], "deepspeed")


def test_zero3_as_checkpoint_is_refused_in_one_line(zero3_run, tmp_path, capsys):
    from trainer_checks import run_cli

    run_dir, _ = zero3_run
    code, _ = run_cli("merge", run_dir / "checkpoints", "-o", tmp_path / "out", "--last", "3", "--as-checkpoint",
                      "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "ZeRO 3" in capsys.readouterr().err
