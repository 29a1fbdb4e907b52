"""Merged tensors against an independent fp64 NumPy average, for every schedule, dtype and input layout."""

import json

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, make_state, reference_merge, to_f64, write_series
from safetensors import safe_open
from safetensors.torch import load_file

from ckptmerge import compute_coeffs, discover, merge, select_last
from ckptmerge.merging.schedules import SCHEDULES, SIGNED

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
PARAMS = {"ema": {"alpha": 0.3}, "pair": {"lam": 0.65}, "custom": {"weights": [0.1, 0.2, 0.3, 0.4]},
          "swa": {"start_step": 200}}


def load_output(folder):
    """Read a merged folder with the safetensors library (not ckptmerge's reader)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(folder / name))
    return out


def assert_matches_reference(out, states, coeffs, accum=torch.float32):
    ref = reference_merge(states, coeffs)
    assert set(out) == set(ref)
    n = len(states)
    for name, expected in ref.items():
        got = out[name]
        if not states[-1][name].dtype.is_floating_point:
            assert got.dtype == states[-1][name].dtype and np.array_equal(got.numpy(), expected), name
            continue
        # bound: accumulation error (n adds in the accumulator dtype) + one rounding to the output dtype
        magnitude = sum(abs(c) * np.abs(to_f64(s[name])) for c, s in zip(coeffs, states))
        allowed = 4 * n * UNIT_ROUNDOFF[accum] * magnitude + UNIT_ROUNDOFF[got.dtype] * np.abs(expected) + 1e-7
        err = np.abs(to_f64(got) - expected)
        assert np.all(err <= allowed), f"{name}: max error {err.max():.3g} exceeds bound"


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES.keys() - SIGNED))  # phema: tests/test_posthoc_ema.py
def test_every_schedule_and_dtype_matches_fp64_numpy(tmp_path, schedule, dtype):
    states = [make_state(seed, FLOAT_DTYPES[dtype], step=seed) for seed in range(4)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    if schedule == "pair":
        refs, states = refs[-2:], states[-2:]
    coeffs = compute_coeffs(schedule, refs, **PARAMS.get(schedule, {}))
    merge(refs, coeffs, tmp_path / "out", progress=False)
    out = load_output(tmp_path / "out")
    assert all(out[k].dtype == v.dtype for k, v in states[-1].items())  # default: the inputs' dtype
    assert_matches_reference(out, states, coeffs)


@pytest.mark.parametrize("layout", ["hf-safetensors", "hf-sharded", "hf-bin", "safetensors-file", "pt-nested", "dcp"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_input_layout_round_trips(tmp_path, layout, dtype):
    states = [make_state(seed, FLOAT_DTYPES[dtype], step=seed) for seed in range(3)]
    write_series(tmp_path / "run", states, layout=layout)
    found = discover(tmp_path / "run").checkpoints
    assert [r.step for r in found] == [100, 200, 300]
    coeffs = compute_coeffs("wma", found)
    merge(found, coeffs, tmp_path / "out", progress=False)
    assert_matches_reference(load_output(tmp_path / "out"), states, coeffs)


def test_output_dtype_override_and_fp64_accumulation(tmp_path):
    states = [make_state(seed, torch.bfloat16) for seed in range(3)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    coeffs = compute_coeffs("ema", refs, alpha=0.4)
    merge(refs, coeffs, tmp_path / "f32", out_dtype="float32", progress=False)
    out = load_output(tmp_path / "f32")
    assert out["embed.weight"].dtype == torch.float32 and out["buffers.step"].dtype == torch.int64
    assert_matches_reference(out, states, coeffs)
    merge(refs, coeffs, tmp_path / "f64acc", out_dtype="float32", accum_dtype="float64", progress=False)
    assert_matches_reference(load_output(tmp_path / "f64acc"), states, coeffs, accum=torch.float64)


def test_chunked_merge_is_byte_identical_to_whole_tensor_merge(tmp_path, series):
    run_dir, states, _ = series
    refs = discover(run_dir).checkpoints
    coeffs = compute_coeffs("wma", refs)
    merge(refs, coeffs, tmp_path / "whole", progress=False)
    merge(refs, coeffs, tmp_path / "rows", chunk_bytes=40, progress=False)  # 40 B: a few rows per slice
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert whole == (tmp_path / "rows" / "model.safetensors").read_bytes()
    assert_matches_reference(load_output(tmp_path / "rows"), states, coeffs)


def test_sharded_output_respects_cap_and_has_index(tmp_path, series):
    run_dir, states, _ = series
    refs = discover(run_dir).checkpoints
    coeffs = compute_coeffs("sma", refs)
    merge(refs, coeffs, tmp_path / "out", max_shard_bytes=1024, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            data = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            assert data <= 1024 or len(list(f.keys())) == 1
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in states[-1].values())
    assert_matches_reference(load_output(tmp_path / "out"), states, coeffs)


def test_same_inputs_and_recipe_give_byte_identical_files(tmp_path, series):
    run_dir, _, _ = series
    refs = select_last(discover(run_dir).checkpoints, 3)
    coeffs = compute_coeffs("ema", refs, alpha=0.5)
    for out in ("a", "b"):
        merge(refs, coeffs, tmp_path / out, max_shard_bytes=600, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.endswith((".safetensors", ".index.json")))
    assert len(files) > 2
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
