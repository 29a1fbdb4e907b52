"""Tied weights are merged once, and merged folders load with transformers' from_pretrained."""

import json

import numpy as np
import pytest
import torch

from ckptmerge import compute_coeffs, discover, merge

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int, tied: bool = True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def unique_params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}  # named_parameters dedups ties


def expected_average(models, coeffs):
    params = [unique_params(m) for m in models]
    return {k: sum(c * p[k] for c, p in zip(coeffs, params)) for k in params[-1]}


@pytest.mark.parametrize("save_as", ["safetensors", "torch-bin"])
def test_tied_model_merges_once_and_loads_with_from_pretrained(tmp_path, save_as):
    models = [tiny_llama(seed) for seed in range(3)]
    for step, model in zip((100, 200, 300), models):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        if save_as == "safetensors":
            model.save_pretrained(folder)
        else:  # a raw state_dict: lm_head.weight and embed_tokens.weight share one storage
            folder.mkdir(parents=True)
            model.config.save_pretrained(folder)
            sd = model.state_dict()
            assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
            torch.save(sd, folder / "pytorch_model.bin")
    refs = discover(tmp_path / "run").checkpoints
    coeffs = compute_coeffs("ema", refs, alpha=0.4)
    result = merge(refs, coeffs, tmp_path / "merged", progress=False)

    manifest = json.loads((tmp_path / "merged" / "merge.json").read_text())
    if save_as == "torch-bin":
        assert manifest["tensors"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in [t.name for t in result.plan.tasks]  # stored (and merged) once

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    got = unique_params(loaded)
    for name, want in expected_average(models, coeffs).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_untied_model_keeps_both_matrices(tmp_path):
    models = [tiny_llama(seed, tied=False) for seed in range(2)]
    for step, model in zip((1, 2), models):
        model.save_pretrained(tmp_path / "run" / f"step-{step}")
    refs = discover(tmp_path / "run").checkpoints
    merge(refs, compute_coeffs("pair", refs, lam=0.75), tmp_path / "merged", out_dtype="bfloat16", progress=False)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    want = expected_average(models, [0.25, 0.75])
    got = unique_params(loaded)
    assert "lm_head.weight" in got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2**-8, atol=1e-6, err_msg=name)
