"""Runs that live in an object store (issue 25): inspect and merge ``s3://`` runs served by a real S3 API
server on this machine (moto, ``tests/s3_server.py``), compared tensor-for-tensor with the local merge of the
same files and with an fp64 NumPy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmerge.cli.main import main
from conftest import make_state, reference_merge, to_f64, write_checkpoint
from s3_server import SECRET, s3, s3_server, upload  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(tmp_path, layouts=("hf-safetensors", "hf-sharded", "hf-safetensors", "hf-safetensors")):
    """Four HF folders ``checkpoint-N`` (one of them sharded) with trainer_state.json and a config."""
    run = tmp_path / "run"
    states = [make_state(seed, dtype=torch.bfloat16, step=100 * (seed + 1)) for seed in range(len(layouts))]
    for i, (state, layout) in enumerate(zip(states, layouts)):
        step = 100 * (i + 1)
        folder = write_checkpoint(run / f"checkpoint-{step}", state, layout)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": step * 64, "log_history": [{"learning_rate": 1e-3 / (i + 1)}]}))
        (folder / "config.json").write_text(json.dumps({"model_type": "test", "torch_dtype": "bfloat16"}))
    return run, states


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_inspect_of_a_bucket_lists_the_local_steps(tmp_path, s3, capsys):
    run, _ = _run(tmp_path)
    upload(s3, run, "runs/inspect")
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    assert main(["inspect", "s3://runs/inspect"]) == 0
    remote = capsys.readouterr().out
    assert local.splitlines() == remote.splitlines()  # same names, steps, tokens, lr, dtypes and sizes
    assert "checkpoint-400" in remote and "4 checkpoints" in remote


@pytest.mark.parametrize("out_kind", ["local", "s3"])
def test_merge_from_s3_equals_the_local_merge(tmp_path, s3, out_kind, capsys):
    run, states = _run(tmp_path)
    upload(s3, run, "runs/merge")
    assert main(["merge", str(run), "--last", "3", "-o", str(tmp_path / "local-out"), "--quiet"]) == 0
    out = str(tmp_path / "remote-out") if out_kind == "local" else f"s3://runs/merged-{out_kind}"
    assert main(["merge", "s3://runs/merge", "--last", "3", "-o", out, "--quiet", "--io-concurrency", "3"]) == 0
    if out_kind == "s3":
        (tmp_path / "remote-out").mkdir()
        s3.get(f"runs/merged-{out_kind}/", str(tmp_path / "remote-out") + "/", recursive=True)
    local, remote = _tensors(tmp_path / "local-out"), _tensors(tmp_path / "remote-out")
    assert local.keys() == remote.keys()
    for name in local:
        assert local[name].dtype == remote[name].dtype and torch.equal(local[name], remote[name]), name
    expected = reference_merge(states[1:], [1 / 3] * 3)
    for name, value in expected.items():
        np.testing.assert_allclose(to_f64(remote[name]), value, rtol=1e-2, atol=1e-2)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://runs/merge/checkpoint-{s}" for s in (200, 300, 400)]
    assert all(i["content_hash"].startswith("etag-sha256:") for i in manifest["inputs"])
    assert json.loads((tmp_path / "remote-out" / "config.json").read_text())["model_type"] == "test"
    assert SECRET not in (tmp_path / "remote-out" / "merge.json").read_text() + capsys.readouterr().out
