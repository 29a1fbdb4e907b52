"""Periodic evaluation of an online average in a plain loop (``Averager.evaluate`` with ``PeriodicEval``).

The reference is transformers' own loss of fresh models holding the recorded training weights and an fp64 EMA
folded by hand, on windows rebuilt here from the data's bytes / ids.
"""

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from eval_reference import reference_windows, transformers_losses  # noqa: E402

from ckptmerge.errors import ConfigError  # noqa: E402
from ckptmerge.online import EMA  # noqa: E402
from ckptmerge.online.periodic_eval import PeriodicEval  # noqa: E402

CONTEXT, TOKENS = 32, 96  # 3 windows of 33 ids per data set


def test_plain_loop_evaluate_equals_transformers_loss_on_windows_built_once(tmp_path, monkeypatch):
    from ckptmerge.data.tokenizer import save_hf_tokenizer

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    save_hf_tokenizer(tmp_path / "model")  # found beside the model's config._name_or_path
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(3)
    text = tmp_path / "held.txt"
    text.write_bytes(bytes(torch.randint(97, 123, (400,), generator=g).tolist()))
    ids = tmp_path / "held.npy"  # a token file: read as it is, no tokenizer
    np.save(ids, torch.randint(0, 256, (300,), generator=g).numpy().astype(np.uint16))
    windows = {"held.txt": reference_windows(torch.tensor(list(text.read_bytes())), TOKENS // CONTEXT, CONTEXT),
               "held.npy": reference_windows(torch.from_numpy(np.load(ids).astype(np.int64)), TOKENS // CONTEXT, CONTEXT)}

    avg, evaluation = EMA(0.5), PeriodicEval([str(text), str(ids)], every=2, tokens=TOKENS)
    assert avg.evaluate(model, 2, evaluation) == {}  # no update yet: nothing to compare
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    ema, results = None, {}
    for step in range(1, 5):
        batch = torch.randint(0, 256, (4, 16), generator=g)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        avg.update(model, step)
        current = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
        ema = current if ema is None else {k: 0.5 * ema[k] + 0.5 * current[k] for k in current}
        results[step] = (avg.evaluate(model, step, evaluation), current, ema)
        for name, value in current.items():  # the training weights came back after the swap
            assert torch.equal(model.state_dict()[name].double(), value), name
        if step == 2:  # windows are kept from the first evaluation: a changed file is not read again
            text.write_bytes(b"z" * 400)

    assert results[1][0] == results[3][0] == {}
    for step in (2, 4):
        metrics, current, ema = results[step]
        assert sorted(metrics) == sorted(f"eval/{who}/{name}/{what}" for name in windows
                                         for who, what in [("raw", "loss"), ("raw", "bits_per_byte"),
                                                           ("merged/ema", "loss"), ("merged/ema", "bits_per_byte"),
                                                           ("merged/ema", "delta_vs_raw"),
                                                           ("merged/ema", "delta_vs_raw_se")])
        for name, rows in windows.items():
            raw, merged = transformers_losses(config, current, rows), transformers_losses(config, ema, rows)
            assert abs(metrics[f"eval/raw/{name}/loss"] - raw.mean()) < 1e-5
            assert abs(metrics[f"eval/merged/ema/{name}/loss"] - merged.mean()) < 1e-5
            assert abs(metrics[f"eval/merged/ema/{name}/delta_vs_raw"] - (merged - raw).mean()) < 1e-5
            se = (merged - raw).std() / math.sqrt(len(rows))
            assert abs(metrics[f"eval/merged/ema/{name}/delta_vs_raw_se"] - se) < 1e-5
        assert abs(metrics["eval/raw/held.txt/bits_per_byte"] - metrics["eval/raw/held.txt/loss"] / math.log(2)) < 1e-9


def test_periodic_eval_refuses_bad_options_in_one_line():
    with pytest.raises(ConfigError, match="every must be at least 1.*data is empty"):
        PeriodicEval([], every=0)
    with pytest.raises(ConfigError, match="without eval_every"):
        PeriodicEval.from_options(None, ["held.txt"], 1024, None, None)
    assert PeriodicEval.from_options(None, (), 1024, None, None) is None


def test_settings_that_cannot_apply_to_the_live_model_are_refused():
    from ckptmerge.errors import ConfigError
    from ckptmerge.evaluation.settings import EvalSettings
    from ckptmerge.online.periodic_eval import PeriodicEval

    for settings in (EvalSettings(device="cuda"), EvalSettings(dtype="bfloat16")):
        with pytest.raises(ConfigError, match="cannot apply"):
            PeriodicEval(["shakespeare-val"], every=2, settings=settings)
    PeriodicEval(["shakespeare-val"], every=2, settings=EvalSettings(batch_size=4))  # what applies is accepted
