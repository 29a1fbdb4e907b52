"""Every MergeOptions field reaches every merge path: each changes the output (or merge.json, or the outcome)
the same way in one process and on 2 gloo ranks under torchrun, checked against an fp64 NumPy reference."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_state, reference_merge, write_series
from safetensors.torch import load_file

from ckptmerge.errors import ConfigError
from ckptmerge.merging.options import MergeOptions, merge_options

TESTS = Path(__file__).parent
WORKER = TESTS / "merge_options_worker.py"
DISPLAY_ONLY = {"progress"}  # changes what the terminal shows, never the result: not recorded in merge.json
SMA3 = [1 / 3] * 3


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(file)
        assert not set(part) & set(out)
        out.update(part)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN compares equal to the same NaN)."""
    return t.reshape(-1).view(torch.uint8)


def _cases(run: Path, paths: list[Path], out: Path) -> list[dict]:
    """One merge per field (a value other than its default), plus the default merge to compare with."""
    sma = [str(p) for p in paths[-3:]]
    pair = [str(p) for p in paths[-2:]]
    nan = [str(run.parent / "nan-run" / f"step-{s:06d}") for s in (100, 200)]

    def case(name, options, inputs=sma, coeffs=SMA3, **extra):
        return {"name": name, "inputs": inputs, "coeffs": coeffs, "output": str(out / name), "options": options,
                **extra}

    return [
        case("default", {}),
        case("out_dtype", {"out_dtype": "bfloat16"}),
        case("accum_dtype", {"accum_dtype": "float64"}),
        case("device", {"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "no-such-device"}),
        case("chunk_bytes", {"chunk_bytes": 64}),
        case("allow_nonfinite", {"allow_nonfinite": True}, inputs=nan, coeffs=[0.5, 0.5]),
        case("allow_nonfinite-off", {}, inputs=nan, coeffs=[0.5, 0.5]),
        case("allow_unnormalized", {"allow_unnormalized": True}, coeffs=[1.0, 1.0, 1.0]),
        case("allow_unnormalized-off", {}, coeffs=[1.0, 1.0, 1.0]),
        case("allow_negative", {"allow_negative": True}, inputs=pair, coeffs=[-0.5, 1.5]),
        case("allow_negative-off", {}, inputs=pair, coeffs=[-0.5, 1.5]),
        case("max_shard_bytes", {"max_shard_bytes": 600}),
        case("direct_io", {"direct_io": True}),
        case("hash", {"hash": "none"}),
        case("force", {"force": True}, precreate=True),
        case("force-off", {}, precreate=True),
        case("as_checkpoint", {"as_checkpoint": True}),
    ]


def _run(cases: list[dict], tmp: Path, ranks: int) -> dict:
    cases_file, results_file = tmp / f"cases-{ranks}.json", tmp / f"results-{ranks}.json"
    cases_file.write_text(json.dumps(cases))
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(launcher + [str(WORKER), str(cases_file), str(results_file)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results_file.read_text())


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The same cases merged in one process (out1/) and on 2 ranks (out2/): (states, paths, results, tmp)."""
    tmp = tmp_path_factory.mktemp("options")
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(4)]
    paths = write_series(tmp / "run", states)
    (paths[-1] / "optimizer.pt").write_bytes(b"trainer state the hand-back must carry\n")
    nan_states = [make_state(10 + s) for s in range(2)]
    nan_states[0]["layers.0.attn.bias"][3] = float("nan")
    write_series(tmp / "nan-run", nan_states)
    results = {ranks: _run(_cases(tmp / "run", paths, tmp / f"out{ranks}"), tmp, ranks) for ranks in (1, 2)}
    return states, paths, results, tmp


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "merge.json").read_text())


def test_every_field_has_a_case():
    names = {c["name"] for c in _cases(Path("r"), [Path("a"), Path("b"), Path("c")], Path("o"))}
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    assert fields - DISPLAY_ONLY <= names, fields - DISPLAY_ONLY - names
    assert DISPLAY_ONLY.isdisjoint(MergeOptions().record())


def test_one_and_two_ranks_agree_on_every_case(merged):
    _, _, results, tmp = merged
    assert results[1].keys() == results[2].keys()
    for name, one in results[1].items():
        two = results[2][name]
        assert one["ok"] == two["ok"], (name, one, two)
        if not one["ok"]:
            same = two["error"].removesuffix(" (on rank 1)").replace(str(tmp / "out2"), str(tmp / "out1"))
            assert same == one["error"], name  # the same one-line error
            assert not (tmp / "out1" / name).exists() or name.startswith("force")
            continue
        a, b = _load_folder(tmp / "out1" / name), _load_folder(tmp / "out2" / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(_bits(a[key]), _bits(b[key])), (name, key)
        m1, m2 = _manifest(tmp / "out1" / name), _manifest(tmp / "out2" / name)
        assert m1["options"] == m2["options"], name
        assert m1["dtype_policy"] == m2["dtype_policy"] and m1["tensors"] == m2["tensors"], name
        assert [i["content_hash"] for i in m1["inputs"]] == [i["content_hash"] for i in m2["inputs"]], name
        assert (m1["world_size"], m2["world_size"]) == (1, 2)
        extra1 = {p.name for p in (tmp / "out1" / name).iterdir() if not p.name.startswith("model")}
        extra2 = {p.name for p in (tmp / "out2" / name).iterdir() if not p.name.startswith("model")}
        assert extra1 == extra2, name


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_option_has_its_effect(merged, ranks):
    states, paths, results, tmp = merged
    out = tmp / f"out{ranks}"
    ok = {name: r["ok"] for name, r in results[ranks].items()}
    errors = {name: r["error"] for name, r in results[ranks].items()}
    default = _load_folder(out / "default")
    expected = reference_merge(states[-3:], SMA3)
    for key, value in expected.items():
        np.testing.assert_allclose(default[key].to(torch.float64).numpy(), value, rtol=1e-6, atol=1e-6)
    for name in ok:
        if ok[name]:
            recorded = _manifest(out / name)["options"]
            case_options = {"out_dtype": "bfloat16", "accum_dtype": "float64", "chunk_bytes": 64,
                            "allow_nonfinite": True, "allow_unnormalized": True, "allow_negative": True,
                            "max_shard_bytes": 600, "direct_io": True, "hash": "none", "force": True,
                            "as_checkpoint": True}
            if name in case_options:
                assert recorded[name] == case_options[name], name  # merge.json records what was used
    # out_dtype: bf16 tensors, the fp64 reference within bf16 rounding
    bf16 = _load_folder(out / "out_dtype")
    for key, value in expected.items():
        if states[-1][key].is_floating_point():
            assert bf16[key].dtype == torch.bfloat16
            np.testing.assert_allclose(bf16[key].double().numpy(), value, rtol=2**-8, atol=1e-6, err_msg=key)
    assert _manifest(out / "accum_dtype")["dtype_policy"]["accumulate"] == "float64"
    chunked = _load_folder(out / "chunk_bytes")
    assert all(torch.equal(chunked[k], default[k]) for k in default)
    assert not ok["device"] and ("cuda" in errors["device"].lower() or "device" in errors["device"].lower())
    assert not (out / "device").exists()
    # allow_nonfinite: refused by default, NaN carried through when allowed
    assert not ok["allow_nonfinite-off"] and "nan" in errors["allow_nonfinite-off"].lower()
    assert torch.isnan(_load_folder(out / "allow_nonfinite")["layers.0.attn.bias"][3])
    # allow_unnormalized: refused by default; the plain sum when allowed
    assert not ok["allow_unnormalized-off"] and not (out / "allow_unnormalized-off").exists()
    summed = reference_merge(states[-3:], [1.0, 1.0, 1.0])
    got = _load_folder(out / "allow_unnormalized")
    np.testing.assert_allclose(got["embed.weight"].double().numpy(), summed["embed.weight"], rtol=1e-6, atol=1e-5)
    # allow_negative: refused by default; extrapolation when allowed
    assert not ok["allow_negative-off"] and not (out / "allow_negative-off").exists()
    extrap = reference_merge(states[-2:], [-0.5, 1.5])
    got = _load_folder(out / "allow_negative")
    np.testing.assert_allclose(got["embed.weight"].double().numpy(), extrap["embed.weight"], rtol=1e-6, atol=1e-5)
    # max_shard_bytes: several shards and an index
    shards = len(list((out / "max_shard_bytes").glob("*.safetensors")))
    assert shards > len(list((out / "default").glob("*.safetensors"))) == ranks  # one shard per rank by default
    assert (out / "max_shard_bytes" / "model.safetensors.index.json").is_file()
    direct = _load_folder(out / "direct_io")
    assert all(torch.equal(direct[k], default[k]) for k in default)
    assert all(i["content_hash"] is None for i in _manifest(out / "hash")["inputs"])
    assert all(i["content_hash"] for i in _manifest(out / "default")["inputs"])
    # force: an existing output is refused by default and replaced with it
    assert not ok["force-off"] and "--force" in errors["force-off"]
    assert (out / "force-off" / "old.txt").is_file() and not (out / "force" / "old.txt").exists()
    # as_checkpoint: the newest checkpoint's trainer state beside the merged weights
    assert (out / "as_checkpoint" / "optimizer.pt").read_bytes() == (paths[-1] / "optimizer.pt").read_bytes()
    assert not (out / "default" / "optimizer.pt").exists()


def test_options_validate_and_old_keywords_warn():
    with pytest.raises(ConfigError, match="out_dtype"):
        MergeOptions(out_dtype="fp8")
    with pytest.raises(ConfigError, match="max_shard_bytes"):
        MergeOptions(max_shard_bytes=0)
    with pytest.raises(ConfigError, match="unknown merge option"):
        merge_options(None, shard_size=3)
    with pytest.warns(DeprecationWarning, match="out_dtype"):
        assert merge_options(None, dtype=torch.bfloat16).out_dtype == "bfloat16"
    with pytest.warns(DeprecationWarning, match="hash"):
        assert merge_options(None, hash_mode="full").hash == "full"
    assert MergeOptions(accum_dtype=torch.float64).accum_dtype == "float64"
