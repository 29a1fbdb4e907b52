"""Merge and eval on 2 gloo ranks under torchrun, checked against one process and independent references."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_state, reference_merge, write_series
from safetensors.torch import load_file

from ckptmerge.parallel.split import split_by_cost

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder, read with the safetensors library (the index names the shards)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        part = load_file(folder / name)
        assert not set(part) & set(out)
        out.update(part)
    return out


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_by_cost_is_contiguous_complete_and_balanced(parts):
    rng = np.random.default_rng(parts)
    costs = rng.integers(0, 1000, size=37).tolist() + [5000]
    ranges = split_by_cost(costs, parts)
    assert len(ranges) == parts
    assert [i for r in ranges for i in r] == list(range(len(costs)))
    fair = sum(costs) / parts
    assert max(sum(costs[i] for i in r) for r in ranges) <= fair + max(costs)


def test_torchrun_merge_equals_one_process_and_the_fp64_reference(tmp_path):
    from ckptmerge import compute_coeffs, discover, merge, select_last

    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(5)]
    run = tmp_path / "run"
    write_series(run, states, layout="hf-sharded")
    proc = _torchrun(["-m", "ckptmerge", "merge", str(run), "-o", str(tmp_path / "out2"), "--schedule", "ema",
                      "--alpha", "0.3", "--last", "4", "--max-shard-size", "600B", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports for the job

    refs = select_last(discover(run).checkpoints, 4)
    coeffs = compute_coeffs("ema", refs, alpha=0.3)
    merge(refs, coeffs, tmp_path / "out1", progress=False)
    two, one = _load_folder(tmp_path / "out2"), _load_folder(tmp_path / "out1")
    assert set(two) == set(one) == set(states[-1])
    for name in one:
        assert two[name].dtype == one[name].dtype and torch.equal(two[name], one[name]), name
    expected = reference_merge(states[1:], coeffs)
    for name, value in expected.items():
        np.testing.assert_allclose(two[name].to(torch.float64).numpy(), value, rtol=1e-6, atol=1e-6)

    manifest = json.loads((tmp_path / "out2" / "merge.json").read_text())
    assert manifest["world_size"] == 2
    ranks = manifest["stats"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["tensors"] > 0 for r in ranks)
    assert sum(r["tensors"] for r in ranks) == len(states[-1])
    assert json.loads((tmp_path / "out1" / "merge.json").read_text())["world_size"] == 1


def test_bad_tensor_on_one_rank_stops_both_with_one_error_and_no_output(tmp_path):
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(4)]
    states[2]["layers.1.mlp.weight"][3, 1] = float("nan")  # late in the plan: merged by rank 1
    run = tmp_path / "run"
    write_series(run, states, layout="hf-sharded")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _torchrun(["-m", "ckptmerge", "merge", str(run), "-o", str(tmp_path / "out"), "--schedule", "sma",
                      "--last", "4", "--quiet"], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ckptmerge merge: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "step-000300" in errors[0] and "layers.1.mlp.weight" in errors[0] and "(on rank 1)" in errors[0]
    # A rank leaves with code 2 (a clean error). torchrun stops the other ranks once one has exited, so
    # whether the second is reported with code 2 too or was stopped first is timing; neither may crash.
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)  # torchrun's failure summary, one entry per rank listed
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes  # -15: SIGTERM from torchrun after the first exit
    assert "ckptmerge/" not in "".join(line for line in proc.stderr.splitlines() if line.lstrip().startswith("File "))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing at OUT, no temporary folder
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _tiny_llama(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    from ckptmerge.data.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(folder)  # eval tokenizes with the model's own tokenizer: here the byte tokenizer
    return folder


EVAL_SCRIPT = """
import json, sys
from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.distributed import evaluate_sharded
from ckptmerge.evaluation.evaluator import load_model, paired_difference
from ckptmerge.parallel.world import rank
windows = eval_windows(load_tokens(sys.argv[1]), n_tokens=1600, context=32)
a, b = (evaluate_sharded(load_model(p), windows, batch_size=7) for p in sys.argv[2:4])
pruned = evaluate_sharded(load_model(sys.argv[2]), windows, batch_size=7, stop=lambda mean, batches: batches == 3)
if rank() == 0:
    print(json.dumps({"a": a.window_losses, "b": b.window_losses, "paired": paired_difference(a, b),
                      "pruned": pruned.window_losses}))
"""


def test_torchrun_eval_equals_one_rank_and_transformers_loss(tmp_path):
    pytest.importorskip("transformers")
    from ckptmerge.data.batches import eval_windows
    from ckptmerge.data.tokens import load_tokens
    from ckptmerge.evaluation.evaluator import evaluate_model, load_model, paired_difference

    os.environ["CKPTMERGE_CACHE"] = str(tmp_path / "cache")
    data = tmp_path / "val.txt"
    data.write_text(" ".join(np.random.default_rng(0).choice(["to", "be", "or", "not", "that"], 3000)))
    a, b = _tiny_llama(tmp_path / "a", 0), _tiny_llama(tmp_path / "b", 1)
    args = ["-m", "ckptmerge", "eval", str(a), "--data", str(data), "--tokens", "1600", "--context", "32",
            "--batch-size", "5"]
    proc = _torchrun(args + ["--json", str(tmp_path / "two.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ckptmerge.cli.main import main

    assert main(args[2:] + ["--json", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())[str(a)][str(data)]
    one = json.loads((tmp_path / "one.json").read_text())[str(a)][str(data)]
    assert two["windows"] == one["windows"] == 50 and two["tokens"] == one["tokens"]
    assert abs(two["loss"] - one["loss"]) < 1e-6 and abs(two["stderr"] - one["stderr"]) < 1e-6

    windows = eval_windows(load_tokens(str(data)), n_tokens=1600, context=32)
    model = load_model(a)
    with torch.no_grad():  # transformers' own loss, one window at a time, fp64 statistics
        reference = np.array([float(model(input_ids=w[None], labels=w[None].clone()).loss) for w in windows])
    assert abs(two["loss"] - reference.mean()) < 1e-5
    assert abs(two["stderr"] - reference.std(ddof=1) / math.sqrt(len(reference))) < 1e-6

    script = tmp_path / "eval_script.py"
    script.write_text(EVAL_SCRIPT)
    proc = _torchrun([str(script), str(data), str(a), str(b)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = json.loads(proc.stdout.strip().splitlines()[-1])
    single_a = evaluate_model(model, windows, batch_size=7)
    single_b = evaluate_model(load_model(b), windows, batch_size=7)
    np.testing.assert_allclose(gathered["a"], single_a.window_losses, atol=1e-6, rtol=0)
    np.testing.assert_allclose(gathered["b"], single_b.window_losses, atol=1e-6, rtol=0)
    np.testing.assert_allclose(gathered["paired"], paired_difference(single_a, single_b), atol=1e-6, rtol=0)
    stopped = evaluate_model(model, windows, batch_size=7, stop=lambda mean, batches: batches == 3)
    assert len(gathered["pruned"]) == len(stopped.window_losses) == 21
    np.testing.assert_allclose(gathered["pruned"], stopped.window_losses, atol=1e-6, rtol=0)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_device_stops_both_ranks_with_one_error_and_no_output(tmp_path):
    run = tmp_path / "run"
    write_series(run, [make_state(seed, step=100 * (seed + 1)) for seed in range(2)], layout="hf-sharded")
    proc = _torchrun(["-m", "ckptmerge", "merge", str(run), "-o", str(tmp_path / "out"), "--device", "cuda",
                      "--quiet"], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ckptmerge merge: error:")]
    assert len(errors) == 1 and "--device cpu" in errors[0], proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("resolve", ["evaluation", "merging"])
def test_cuda_under_torchrun_means_each_ranks_own_gpu(monkeypatch, resolve):
    """torchrun's LOCAL_RANK picks the GPU for ``cuda`` (and eval's ``auto``); an explicit index is kept."""
    from ckptmerge.evaluation.devices import resolve_device as eval_device
    from ckptmerge.merging.device import resolve_device as merge_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    pick = eval_device if resolve == "evaluation" else merge_device
    assert pick("cuda") == torch.device("cuda", 3)
    assert pick("cuda:1") == torch.device("cuda", 1)
    if resolve == "evaluation":
        assert pick("auto") == torch.device("cuda", 3)
