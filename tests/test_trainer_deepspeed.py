"""DeepSpeed runs written by ``engine.save_checkpoint`` (ZeRO 0 fp32, ZeRO 1 fp32, ZeRO 2 bf16) on CPU."""

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


def run_script(*args, port: int) -> None:
    env = dict(os.environ, MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


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
