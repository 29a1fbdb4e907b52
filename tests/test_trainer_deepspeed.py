"""DeepSpeed runs written by ``engine.save_checkpoint`` on CPU: ZeRO 0 fp32, ZeRO 1 fp32, ZeRO 2 bf16 on one rank;
ZeRO 2 and ZeRO 3 fp32 and bf16 on two gloo ranks (ZeRO 3 on one too), checked against DeepSpeed's own
``zero_to_fp32``; hand-backs resumed under DeepSpeed's default config (masters from the optimizer files)."""

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


def resume_under_default_config(run_dir: Path, tmp_path: Path, stage: int, dtype: str, world: int,
                                port: int, *flags: str) -> dict:
    """merge --last 3 --as-checkpoint, then DeepSpeed's own load_checkpoint under its default config on
    ``world`` ranks: the module and fp32 masters after loading and after one step with lr 0."""
    from trainer_checks import run_cli

    out = tmp_path / "merged"
    code, printed = run_cli("merge", run_dir / "checkpoints", "-o", out, "--last", "3", "--as-checkpoint",
                            "--quiet", *flags)
    assert code == 0 and (out / "latest").read_text() == "global_step8"
    assert "moments" in printed.splitlines()[1] and "global_step8" in printed.splitlines()[1], printed
    run_script("resume-default", tmp_path, stage, dtype, out, "global_step8", port=port, world=world)
    return torch.load(tmp_path / "resumed_default.pt")


def assert_resumed_at(resumed: dict, masters_want: dict, dtype: str) -> None:
    """Masters equal the fp64 reference (1e-6); the module too (fp32) or its bf16 rounding (bf16), at both points."""
    for point in ("loaded", "stepped"):
        for name, want in masters_want.items():
            want32 = want.to(torch.float32).to(torch.float64)
            torch.testing.assert_close(resumed[point]["masters"][name], want32, rtol=0, atol=1e-6, msg=f"{point} {name}")
            module_want = want32 if dtype == "fp32" else want.to(torch.float32).to(torch.bfloat16).to(torch.float64)
            bf16_slack = 0 if dtype == "fp32" else 2.0 ** -8  # an fp32-ulp difference may flip one bf16 rounding
            torch.testing.assert_close(resumed[point]["module"][name], module_want, rtol=bf16_slack, atol=1e-6,
                                       msg=f"{point} module {name}")


ZERO2 = ["fp32", "bf16"]


@pytest.fixture(scope="module", params=ZERO2, ids=[f"zero2-2rank-{d}" for d in ZERO2])
def zero2_run(request, tmp_path_factory):
    dtype = request.param
    run_dir = tmp_path_factory.mktemp(f"ds22{dtype}")
    run_script("train", run_dir, 2, dtype, port=29580 + (dtype == "bf16"), world=2)
    return run_dir, dtype


def test_zero2_hand_back_resumes_from_the_merge_under_the_default_config(zero2_run, tmp_path):
    """Module and fp32 masters equal the fp64 mean of the module weights DeepSpeed loads, after loading and after
    a step with lr 0 (which would copy stale masters into the module)."""
    run_dir, dtype = zero2_run
    resumed = resume_under_default_config(run_dir, tmp_path, 2, dtype, 2, 29582 + (dtype == "bf16"))
    assert resumed["step"] == 9
    reference = torch.load(run_dir / "reference.pt")
    assert_resumed_at(resumed, reference, dtype)


def test_fp32_masters_merge_the_masters_and_hand_them_back(zero2_run, tmp_path):
    """--fp32-masters equals the fp64 mean of DeepSpeed's get_fp32_state_dict_from_zero_checkpoint; handed back,
    DeepSpeed resumes with exactly those masters."""
    from trainer_checks import merged_tensors

    run_dir, dtype = zero2_run
    if dtype == "fp32":
        pytest.skip("in an fp32 run the masters are the module weights (the other test)")
    resumed = resume_under_default_config(run_dir, tmp_path, 2, dtype, 2, 29584, "--fp32-masters")
    reference = torch.load(run_dir / "reference_masters.pt")
    merged = merged_tensors(tmp_path / "merged")
    assert sorted(merged) == sorted(reference)
    for name, want in reference.items():
        np.testing.assert_allclose(merged[name].double().numpy(), want.numpy(), rtol=0, atol=1e-6, err_msg=name)
    assert_resumed_at(resumed, reference, dtype)


def test_fp32_masters_is_refused_for_checkpoints_without_masters(tmp_path, capsys):
    from safetensors.torch import save_file
    from trainer_checks import run_cli

    for step in (1, 2):
        save_file({"w": torch.ones(4, 4) * step}, str(tmp_path / f"step-{step}.safetensors"))
    code, _ = run_cli("merge", tmp_path, "-o", tmp_path / "out", "--fp32-masters", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists() and len(err.strip().splitlines()) == 1
    assert "step-1.safetensors" in err and "drop --fp32-masters" in err


def test_zero3_hand_back_resumes_from_the_merge_under_the_default_config(zero3_run, tmp_path):
    run_dir, world = zero3_run
    dtype = "bf16" if "bf16" in run_dir.name else "fp32"
    if world != 2:
        pytest.skip("one ZeRO 3 hand-back per dtype, on 2 ranks")
    resumed = resume_under_default_config(run_dir, tmp_path, 3, dtype, 2, 29590 + (dtype == "bf16"))
    assert_resumed_at(resumed, torch.load(run_dir / "reference.pt"), dtype)


def _refused_hand_back(run_dir: Path, out: Path, capsys) -> str:
    from trainer_checks import run_cli

    code, _ = run_cli("merge", run_dir, "-o", out, "--last", "2", "--as-checkpoint", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and len(err.strip().splitlines()) == 1, err
    return err


def test_hand_back_refuses_an_hf_checkpoint_holding_deepspeed_weights(tmp_path, capsys):
    """HF Trainer under DeepSpeed resumes from checkpoint-N/global_stepN/, a copy --as-checkpoint cannot rewrite."""
    import json

    from safetensors.torch import save_file

    for step in (2, 4):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        (ckpt / f"global_step{step}").mkdir(parents=True)
        save_file({"w": torch.full((4, 4), float(step))}, str(ckpt / "model.safetensors"))
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({"module": {"w": torch.full((4, 4), float(step))}, "global_steps": step},
                   ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt")
    err = _refused_hand_back(tmp_path / "run", tmp_path / "out", capsys)
    assert "checkpoint-4" in err and "global_step4/" in err and "DeepSpeed" in err


def test_hand_back_refuses_fp32_weights_in_a_deepspeed_optimizer(tmp_path, capsys):
    """ZeRO 0 fp16 keeps fp32 masters (``fp32_groups_flat``) inside the model-states file's optimizer."""
    for step in (2, 4):
        tag = tmp_path / "run" / f"global_step{step}"
        tag.mkdir(parents=True)
        w = torch.full((4, 4), float(step))
        torch.save({"module": {"w": w.half()}, "global_steps": step,
                    "optimizer": {"fp32_groups_flat": [w.reshape(-1)], "optimizer_state_dict": {}}},
                   tag / "mp_rank_00_model_states.pt")
    err = _refused_hand_back(tmp_path / "run", tmp_path / "out", capsys)
    assert "global_step4" in err and "fp32_groups_flat" in err


def test_hand_back_with_a_half_precision_output_is_refused_before_any_work(tmp_path, capsys):
    """The fp32 masters are handed back from an fp32 merge: --out-dtype bfloat16 is refused up front."""
    from trainer_checks import run_cli

    for step in (2, 4):
        tag = tmp_path / "run" / f"global_step{step}"
        tag.mkdir(parents=True)
        torch.save({"module": {"w": torch.full((4, 4), float(step))}, "global_steps": step},
                   tag / "mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    code, _ = run_cli("merge", tmp_path / "run", "-o", out, "--last", "2", "--as-checkpoint", "--out-dtype",
                      "bfloat16", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "drop --out-dtype bfloat16" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder either


def test_zero3_frozen_parameters_are_merged_and_handed_back(tmp_path, monkeypatch):
    """A ZeRO 3 run with a frozen parameter (``frozen_param_fragments``, 2 ranks, padded): the merge equals the fp64
    mean of DeepSpeed's zero_to_fp32, and zero_to_fp32 of the hand-back gives the merge, the frozen one included."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from trainer_checks import merged_tensors, run_cli

    monkeypatch.setenv("CKPTMERGE_TEST_FREEZE", "1")
    run_script("train", tmp_path, 3, "fp32", port=29596, world=2)
    ckpts = tmp_path / "checkpoints"
    assert "0.bias" in torch.load(ckpts / "global_step8" / "zero_pp_rank_1_mp_rank_00_model_states.pt",
                                  weights_only=False)["frozen_param_fragments"]
    reference = {k: v.numpy() for k, v in torch.load(tmp_path / "reference.pt").items()}
    assert "0.bias" in reference
    assert_merge_matches(ckpts, tmp_path / "out", reference, [2, 4, 6, 8], "deepspeed")
    code, _ = run_cli("merge", ckpts, "-o", tmp_path / "back", "--last", "3", "--as-checkpoint", "--quiet")
    assert code == 0
    merged = merged_tensors(tmp_path / "back")
    handed_back = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "back"), tag="global_step8")
    assert sorted(handed_back) == sorted(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(handed_back[name].float(), tensor, rtol=0, atol=0, msg=name)
    # frozen weights do not change, so the merge above equals them; a shifted merge shows the fragments are rewritten
    from ckptmerge.io.layouts.deepspeed import write_back

    shifted = {name: tensor + 1 for name, tensor in merged.items()}
    (tmp_path / "shifted").mkdir()
    write_back(ckpts / "global_step8", shifted, tmp_path / "shifted")
    handed_back = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "shifted"), tag="global_step8")
    for name, tensor in shifted.items():
        torch.testing.assert_close(handed_back[name].float(), tensor, rtol=0, atol=0, msg=name)


def test_zero1_hand_back_resumes_from_the_merge_under_the_default_config(deepspeed_run, tmp_path):
    """ZeRO 1: module and fp32 masters equal the fp64 mean after DeepSpeed's default resume and after a step with lr 0."""
    run_dir, stage, dtype = deepspeed_run
    if stage != 1:
        pytest.skip("ZeRO 1 only (ZeRO 2 and 3 have their own 2-rank tests; ZeRO 0 has no masters)")
    resumed = resume_under_default_config(run_dir, tmp_path, 1, dtype, 1, 29598)
    assert resumed["step"] == 9
    assert_resumed_at(resumed, torch.load(run_dir / "reference.pt"), dtype)
