"""``watch`` writes current/ with the same MergeOptions as ``merge``, and refuses those it cannot honour."""

import json
import os
import time

import numpy as np
import pytest
import torch
from conftest import make_state, reference_merge
from safetensors.torch import load_file, save_file

from ckptmerge.cli.main import main


def _add(run, step, seed, state=None):
    folder = run / f"step-{step:06d}"
    folder.mkdir(parents=True)
    save_file(state or make_state(seed, step=step), folder / "model.safetensors")
    (folder / "optimizer.pt").write_bytes(f"optimizer state at step {step}\n".encode())
    old = time.time() - 60
    for file in folder.iterdir():
        os.utime(file, (old, old))
    return folder


def _load(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_watch_output_options_match_the_offline_merge(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "watch"
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(4)]
    for i, state in enumerate(states):
        _add(run, 100 * (i + 1), i, state)
    assert main(["watch", str(run), "-o", str(out), "--method", "sma:n=3", "--settle-s", "1", "--once",
                 "--out-dtype", "bfloat16", "--accum-dtype", "float64", "--max-shard-size", "600B",
                 "--as-checkpoint"]) == 0
    current = out / "current"
    got = _load(current)
    want = reference_merge(states[-3:], [1 / 3] * 3)
    for name, value in want.items():
        if states[-1][name].is_floating_point():
            assert got[name].dtype == torch.bfloat16, name
            np.testing.assert_allclose(got[name].double().numpy(), value, rtol=2**-8, atol=1e-6, err_msg=name)
        else:
            assert torch.equal(got[name], states[-1][name])
    assert len(list(current.glob("*.safetensors"))) > 1 and (current / "model.safetensors.index.json").is_file()
    assert (current / "optimizer.pt").read_bytes() == b"optimizer state at step 400\n"
    manifest = json.loads((out / "sma-n3" / "merge.json").read_text())
    recorded = manifest["options"]
    assert (recorded["out_dtype"], recorded["accum_dtype"], recorded["max_shard_bytes"]) == ("bfloat16", "float64", 600)
    assert recorded["as_checkpoint"] is True and manifest["recipe"]["watch"]["window_steps"] == [200, 300, 400]


def test_watch_refuses_nonfinite_merges_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    bad = make_state(1, step=200)
    bad["embed.weight"][0, 0] = float("inf")
    _add(run, 100, 0)
    _add(run, 200, 1, bad)
    code = main(["watch", str(run), "-o", str(tmp_path / "w1"), "--method", "sma:n=2", "--settle-s", "1", "--once"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "--allow-nonfinite" in errors[0], err
    assert main(["watch", str(run), "-o", str(tmp_path / "w2"), "--method", "sma:n=2", "--settle-s", "1", "--once",
                 "--allow-nonfinite"]) == 0
    assert torch.isinf(_load(tmp_path / "w2" / "current")["embed.weight"][0, 0])


def test_watch_passes_every_merge_option_to_the_engine(tmp_path):
    run, out = tmp_path / "run", tmp_path / "watch"
    for i in range(3):
        _add(run, 100 * (i + 1), i)
    assert main(["watch", str(run), "-o", str(out), "--method", "sma:n=2", "--method", "ema:alpha=0.5",
                 "--settle-s", "1", "--once", "--chunk-size", "64B", "--hash", "none"]) == 0
    for label in ("sma-n2", "ema-alpha0.5"):
        manifest = json.loads((out / label / "merge.json").read_text())
        assert manifest["options"]["chunk_bytes"] == 64 and manifest["options"]["hash"] == "none", label
        assert all(i["content_hash"] is None for i in manifest["inputs"]), label
    code = main(["watch", str(run), "-o", str(tmp_path / "gpu"), "--settle-s", "1", "--once", "--device", "cuda:7"])
    assert code == 2 and not (tmp_path / "gpu" / "sma-n5").exists()  # a device that is not there fails the run
