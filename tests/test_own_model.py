"""A user's own model and data: eval, search and sweep use the model's BPE tokenizer, and every number is
checked against transformers' own loss on the same text (tests/bpe_model.py), never against ckptmerge."""

import gzip
import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from bpe_model import (  # noqa: E402
    CONTEXT,
    bits_per_byte,
    load_hf,
    merged_hf,
    reference_loss,
    sentences,
    train_run,
)
from ckptmerge.cli.main import main  # noqa: E402

BIG = 1_000_000  # --tokens larger than the data: every token is scored once


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    import os

    os.environ["CKPTMERGE_CACHE"] = str(root / "cache")
    tokenizer, folders = train_run(root / "run")
    docs = sentences(7, 60)  # held-out text: other sentences from the same source
    text = " ".join(docs)
    (root / "heldout.txt").write_text(text)
    (root / "one.jsonl").write_text(json.dumps({"text": text, "id": 1}) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:30]))
    bare = root / "bare" / "checkpoint-40"  # the same model without tokenizer files
    bare.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders[-1] / name, bare / name)
    tokenizer.save_pretrained(root / "tok")
    ids = tokenizer(text)["input_ids"]
    ref, count = reference_loss(load_hf(folders[-1]), ids)
    return {"root": root, "tok": tokenizer, "folders": folders, "text": text, "ids": ids, "ref": ref,
            "count": count, "docs": docs, "bare": bare}


def _eval(capsys, *args):
    code = main(["eval", "--device", "cpu", "--tokens", str(BIG), *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json_eval(tmp_path, capsys, model, data, *extra):
    path = tmp_path / "r.json"
    code, out, err = _eval(capsys, model, "--data", data, "--json", path, *extra)
    assert code == 0, err
    return json.loads(path.read_text())[str(model)][str(data)]


def test_txt_loss_is_transformers_loss_with_the_models_tokenizer(user, tmp_path, capsys):
    r = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "heldout.txt")
    assert abs(r["loss"] - user["ref"]) < 0.02
    assert r["tokens"] == user["count"] == len(user["ids"]) - 1  # every token after the first, once
    first = len(user["tok"].decode(user["ids"][:1]).encode())
    assert r["bytes"] == len(user["text"].encode()) - first
    assert math.isclose(r["bits_per_byte"], bits_per_byte(r["loss"], r["tokens"], r["bytes"]), rel_tol=1e-9)
    assert r["tokens_requested"] > r["tokens"]
    assert r["loss"] < math.log(len(user["tok"])) - 1  # a trained model, far from a uniform guess


def test_jsonl_and_gzip_agree_with_txt(user, tmp_path, capsys):
    txt = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "heldout.txt")
    one = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "one.jsonl")
    gz = user["root"] / "one.jsonl.gz"
    gz.write_bytes(gzip.compress((user["root"] / "one.jsonl").read_bytes()))
    zipped = _json_eval(tmp_path, capsys, user["folders"][-1], gz)
    assert abs(one["loss"] - txt["loss"]) < 1e-5 and abs(zipped["loss"] - txt["loss"]) < 1e-5
    assert one["tokens"] == txt["tokens"] and one["bytes"] == txt["bytes"]


def test_jsonl_documents_are_joined_with_eos(user, tmp_path, capsys):
    tok = user["tok"]
    ids = []
    for i, doc in enumerate(user["docs"][:30]):
        ids += ([tok.eos_token_id] if i else []) + tok(doc)["input_ids"]
    want, count = reference_loss(load_hf(user["folders"][-1]), ids)
    r = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "docs.jsonl", "--text-field", "body")
    assert abs(r["loss"] - want) < 0.02 and r["tokens"] == count


def test_missing_field_names_the_flag(user, capsys):
    code, out, err = _eval(capsys, user["folders"][-1], "--data", user["root"] / "docs.jsonl")
    assert code != 0 and "--text-field" in err and "body" in err and "Traceback" not in err


def test_model_without_tokenizer_is_refused_then_scored_with_tokenizer_flag(user, tmp_path, capsys):
    code, out, err = _eval(capsys, user["bare"], "--data", user["root"] / "heldout.txt")
    assert code != 0 and "--tokenizer" in err and "nats" not in out and out.strip() == ""
    r = _json_eval(tmp_path, capsys, user["bare"], user["root"] / "heldout.txt", "--tokenizer", user["root"] / "tok")
    assert abs(r["loss"] - user["ref"]) < 0.02
    tok_json = user["root"] / "tok" / "tokenizer.json"  # a bare tokenizer.json works too
    r = _json_eval(tmp_path, capsys, user["bare"], user["root"] / "heldout.txt", "--tokenizer", tok_json)
    assert abs(r["loss"] - user["ref"]) < 0.02


def test_bfloat16_on_cpu_stays_close_to_fp32(user, tmp_path, capsys):
    r = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "heldout.txt", "--dtype", "bfloat16")
    assert abs(r["loss"] - user["ref"]) < 0.1


def test_mistyped_paths_are_one_line_errors(user, capsys):
    code, out, err = _eval(capsys, user["root"] / "run" / "checkpoint-41", "--data", user["root"] / "heldout.txt")
    assert code != 0 and "checkpoint-41" in err and "Traceback" not in err and "huggingface" not in err.lower()
    code, out, err = _eval(capsys, user["folders"][-1], "--data", user["root"] / "heldout.txtt")
    assert code != 0 and "heldout.txtt" in err and len(err.strip().splitlines()) == 1


def test_unavailable_device_is_a_clear_error(user, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = _eval(capsys, user["folders"][-1], "--data", user["root"] / "heldout.txt", "--device", "cuda:0")
    assert code != 0 and "--device" in err and "Traceback" not in err


def test_search_objective_is_transformers_loss_of_the_merged_weights(user):
    from ckptmerge.merging.discover import discover
    from ckptmerge.search.objective import MergeObjective

    refs = discover(user["root"] / "run").checkpoints
    objective = MergeObjective(refs, n_tokens=BIG)
    data = str(user["root"] / "heldout.txt")
    for coeffs in ([0.3, 0.7], [0.8, 0.2]):
        got = objective(coeffs, data)
        want, count = reference_loss(merged_hf(user["folders"], coeffs), user["ids"])
        assert abs(got.loss - want) < 1e-3 and got.tokens == count
    # byte-encoding the same text (what ckptmerge did before) would have scored something else entirely
    byte_ids = list(user["text"].encode())
    byte_loss, _ = reference_loss(merged_hf(user["folders"], [0.3, 0.7]), byte_ids)
    assert abs(byte_loss - objective([0.3, 0.7], data).loss) > 1.0


def test_sweep_scores_with_the_models_tokenizer(user, tmp_path):
    from ckptmerge.sweep.run import SweepConfig, sweep

    cfg = SweepConfig(methods=["sma"], n=[2], every=[25], at=[40], data=[str(user["root"] / "heldout.txt")],
                      n_tokens=BIG)
    report = sweep(user["root"] / "run", cfg, tmp_path / "sweep", progress=False, log=lambda *_: None)
    data = cfg.data[0]
    rows = {r["recipe"]: r for r in report["rows"]}
    assert abs(rows["raw"]["loss"][data] - user["ref"]) < 1e-3
    sma, _ = reference_loss(merged_hf(user["folders"], [0.5, 0.5]), user["ids"])
    sma_row = next(r for k, r in rows.items() if k != "raw")
    assert abs(sma_row["loss"][data] - sma) < 1e-3
    assert sma_row["bits_per_byte"][data] > 0


def test_token_files_bin_npy_uint32_and_tokenize_command(user, tmp_path, capsys):
    model, text = user["folders"][-1], user["root"] / "heldout.txt"
    out = tmp_path / "tokens.bin"
    assert main(["data", "tokenize", str(text), "--tokenizer", str(user["root"] / "tok"), "-o", str(out)]) == 0
    capsys.readouterr()
    assert np.array_equal(np.fromfile(out, dtype=np.uint16), user["ids"])  # nanoGPT's layout: raw uint16
    r = _json_eval(tmp_path, capsys, model, out)
    assert abs(r["loss"] - user["ref"]) < 0.02 and r["tokens"] == user["count"]
    wide = tmp_path / "wide.bin"
    np.asarray(user["ids"], dtype=np.uint32).tofile(wide)
    code, _, err = _eval(capsys, model, "--data", wide)
    assert code != 0 and "--token-dtype uint32" in err
    assert abs(_json_eval(tmp_path, capsys, model, wide, "--token-dtype", "uint32")["loss"] - r["loss"]) < 1e-6
    wide.with_name("wide.bin.json").write_text(json.dumps({"dtype": "uint32"}))
    assert abs(_json_eval(tmp_path, capsys, model, wide)["loss"] - r["loss"]) < 1e-6
    npy = tmp_path / "ids.npy"
    np.save(npy, np.asarray(user["ids"], dtype=np.int32))
    assert abs(_json_eval(tmp_path, capsys, model, npy)["loss"] - r["loss"]) < 1e-6


def test_token_ids_past_the_vocabulary_are_a_clear_error(user, tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    np.asarray(user["ids"][:100] + [5000], dtype=np.uint16).tofile(bad)
    code, out, err = _eval(capsys, user["folders"][-1], "--data", bad)
    assert code != 0 and "5000" in err and "vocabulary" in err and "Traceback" not in err


def test_parquet_and_saved_dataset(user, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    txt = _json_eval(tmp_path, capsys, user["folders"][-1], user["root"] / "heldout.txt")
    pq.write_table(pa.table({"text": [user["text"]]}), tmp_path / "h.parquet")
    assert abs(_json_eval(tmp_path, capsys, user["folders"][-1], tmp_path / "h.parquet")["loss"] - txt["loss"]) < 1e-5
    datasets.Dataset.from_dict({"content": [user["text"]]}).save_to_disk(str(tmp_path / "ds"))
    r = _json_eval(tmp_path, capsys, user["folders"][-1], tmp_path / "ds", "--text-field", "content")
    assert abs(r["loss"] - txt["loss"]) < 1e-5


def test_token_cache_is_keyed_by_tokenizer(user, tmp_path):
    from ckptmerge.data.text_tokenizer import byte_tokenizer, load_tokenizer
    from ckptmerge.data.tokens import token_file

    text = str(user["root"] / "heldout.txt")
    bpe = token_file(text, load_tokenizer(user["root"] / "tok"))
    raw = token_file(text, byte_tokenizer())
    assert bpe != raw and bpe.parent != raw.parent
    assert np.array_equal(np.fromfile(bpe, dtype=np.uint16), user["ids"])


def test_raw_pt_with_model_config_prefixes_and_key_map(user, tmp_path, capsys):
    state = load_hf(user["folders"][-1]).state_dict()
    torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}}, tmp_path / "compiled.pt")
    cfg = user["folders"][-1]
    common = ("--model-config", cfg, "--tokenizer", user["root"] / "tok")
    r = _json_eval(tmp_path, capsys, tmp_path / "compiled.pt", user["root"] / "heldout.txt", *common)
    assert abs(r["loss"] - user["ref"]) < 0.02
    torch.save({k.replace("transformer.h.", "blocks."): v for k, v in state.items()}, tmp_path / "renamed.pt")
    code, _, err = _eval(capsys, tmp_path / "renamed.pt", "--data", user["root"] / "heldout.txt", *common)
    assert code != 0 and "missing" in err and "blocks.0" in err and "--key-map" in err
    r = _json_eval(tmp_path, capsys, tmp_path / "renamed.pt", user["root"] / "heldout.txt", *common,
                   "--key-map", r"^blocks\.=transformer.h.")
    assert abs(r["loss"] - user["ref"]) < 0.02


def test_shape_mismatch_is_listed(user, tmp_path, capsys):
    from bpe_model import gpt2

    small = gpt2(len(user["tok"]), n_embd=16)
    small.save_pretrained(tmp_path / "small")
    torch.save(load_hf(user["folders"][-1]).state_dict(), tmp_path / "w.pt")
    code, _, err = _eval(capsys, tmp_path / "w.pt", "--data", user["root"] / "heldout.txt",
                         "--model-config", tmp_path / "small", "--tokenizer", user["root"] / "tok")
    assert code != 0 and "shape" in err and "(16" in err and "Traceback" not in err


def test_model_factory_with_tensor_logits(user, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_arch.py").write_text(
        "import torch\nfrom transformers import AutoConfig, GPT2LMHeadModel\n"
        "class Wrapped(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.inner = GPT2LMHeadModel(AutoConfig.from_pretrained({str(user['folders'][-1])!r}))\n"
        "    def forward(self, ids):\n"
        "        return self.inner(input_ids=ids).logits\n"
        "def build():\n    return Wrapped()\n")
    monkeypatch.chdir(tmp_path)
    torch.save(load_hf(user["folders"][-1]).state_dict(), tmp_path / "w.pt")
    r = _json_eval(tmp_path, capsys, tmp_path / "w.pt", user["root"] / "heldout.txt", "--model-factory",
                   "my_arch:build", "--tokenizer", user["root"] / "tok", "--key-map", "^=inner.", "--context", CONTEXT)
    assert abs(r["loss"] - user["ref"]) < 0.02


def test_python_api_with_device_and_dtype(user):
    import ckptmerge as cm

    results = cm.evaluate([user["folders"][-1]], [str(user["root"] / "heldout.txt")], n_tokens=BIG,
                          device="cpu", dtype="float32")
    r = results[str(user["folders"][-1])][str(user["root"] / "heldout.txt")]
    assert abs(r.loss - user["ref"]) < 0.02 and r.bits_per_byte > 0
