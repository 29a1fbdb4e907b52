"""Issue 24: never a wrong number with exit 0. A Llama-style model whose SentencePiece Unigram tokenizer has
67,500 pieces (real ids >= 65,536), kept at the run directory's root only, as many trainers keep it.

Every loss is checked against transformers' own loss on the same ids (tests/bpe_model.py ``reference_loss``);
every refusal is exit 2 with one line naming the fix and no loss printed."""

import itertools
import json
import string

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from bpe_model import load_hf, merged_hf, reference_loss  # noqa: E402
from ckptmerge.cli.main import main  # noqa: E402

BIG_VOCAB = 67_500
SMALL_VOCAB = 1_500
CONTEXT = 32
WORDS = ["the", "king", "doth", "speak", "and", "queen", "answers", "thee", "not", "so", "river", "runs",
         "under", "stone", "bridges", "quietly", "merchant", "sells", "silver", "rings"]
SPECIALS = ["<unk>", "<s>", "</s>"]
BIG = 1_000_000  # --tokens larger than the data: every token is scored once


def unigram_tokenizer(n_pieces: int):
    """Llama-style SentencePiece Unigram (Metaspace) over a generated vocabulary of ``n_pieces``; no training.

    Specials, then single characters, then filler pieces, and (in the big one) the words last, with the best
    scores: the text's words become ids above 65,536."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\u2581", *string.ascii_lowercase]
    words = ["\u2581" + w for w in WORDS] if n_pieces > 1 << 16 else []
    taken = set(SPECIALS + chars + words)
    filler = (p for n in (3, 4) for p in ("\u2581" + "".join(t) for t in itertools.product(string.ascii_lowercase,
                                                                                          repeat=n)) if p not in taken)
    n_filler = n_pieces - len(SPECIALS) - len(chars) - len(words)
    vocab = ([(s, 0.0) for s in SPECIALS] + [(c, -10.0) for c in chars]
             + [(p, -15.0) for p in itertools.islice(filler, n_filler)] + [(w, -1.0) for w in words])
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)  # 67,500 x 16 tied embedding: ~1.08M parameters


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigvocab")
    import os

    os.environ["CKPTMERGE_CACHE"] = str(root / "cache")
    tok = unigram_tokenizer(BIG_VOCAB)
    folders = []
    for seed, step in ((0, 10), (1, 20)):
        folder = root / "run" / f"checkpoint-{step}"
        llama(seed).save_pretrained(folder)
        folders.append(folder)
    tok.save_pretrained(root / "run")  # the tokenizer at the run's root only
    rng = np.random.default_rng(3)
    text = " ".join(" ".join(rng.choice(WORDS, rng.integers(4, 10))) for _ in range(40))
    (root / "heldout.txt").write_text(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return {"root": root, "run": root / "run", "tok": tok, "folders": folders, "text": text, "ids": ids}


def _eval(capsys, *args):
    code = main(["eval", "--device", "cpu", "--tokens", str(BIG), *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _loss(tmp_path, capsys, model, data, *extra) -> float:
    path = tmp_path / "r.json"
    code, _, err = _eval(capsys, model, "--data", data, "--json", path, *extra)
    assert code == 0, err
    return json.loads(path.read_text())[str(model)][str(data)]["loss"]


def _refused(code, out, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ckptmerge eval: error:"), err
    assert "loss" not in out and "nats" not in out and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_the_tokenizer_is_big_and_its_ids_are_above_uint16(run):
    assert len(run["tok"]) == BIG_VOCAB
    assert min(run["ids"]) >= 1 << 16  # every word is a piece past 65,536
    assert not any((f / "tokenizer.json").exists() for f in run["folders"])


def test_text_eval_finds_the_root_tokenizer_and_matches_transformers(run, tmp_path, capsys):
    want, _ = reference_loss(load_hf(run["folders"][-1]), run["ids"], context=CONTEXT)
    assert _loss(tmp_path, capsys, run["folders"][-1], run["root"] / "heldout.txt") == pytest.approx(want, abs=1e-5)


def test_uint32_bin_without_sidecar_is_refused_naming_the_vocabulary_and_the_flag(run, tmp_path, capsys):
    wide = tmp_path / "wide.bin"
    np.asarray(run["ids"], dtype=np.uint32).tofile(wide)
    _refused(*_eval(capsys, run["folders"][-1], "--data", wide), "67,500", "--token-dtype uint32", str(wide))
    _refused(*_eval(capsys, run["folders"][-1], "--data", wide, "--token-dtype", "uint16"), "uint32", str(wide))
    want, _ = reference_loss(load_hf(run["folders"][-1]), run["ids"], context=CONTEXT)
    got = _loss(tmp_path, capsys, run["folders"][-1], wide, "--token-dtype", "uint32")
    assert got == pytest.approx(want, abs=1e-5)


def test_uint16_misread_of_big_ids_is_caught_without_a_model(run, tmp_path):
    from ckptmerge.data.token_files import read_token_file
    from ckptmerge.errors import DataError

    wide = tmp_path / "wide.bin"
    np.asarray(run["ids"], dtype=np.uint32).tofile(wide)
    halves = np.fromfile(wide, dtype=np.uint16)
    assert halves[1::2].all()  # the high halves are 1, not 0: the old "every second uint16 is zero" check missed it
    with pytest.raises(DataError, match="uint32"):
        read_token_file(wide)
    narrow = tmp_path / "narrow.bin"
    np.asarray(run["ids"], dtype=np.uint32).astype(np.uint16).tofile(narrow)  # real uint16 ids stay readable
    assert np.array_equal(read_token_file(narrow), np.asarray(run["ids"]) % (1 << 16))


def test_tokenize_writes_uint32_with_its_sidecar_and_a_contradicting_flag_is_refused(run, tmp_path, capsys):
    out = tmp_path / "tokens.bin"
    assert main(["data", "tokenize", str(run["root"] / "heldout.txt"), "--tokenizer", str(run["run"]),
                 "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "tokens.bin.json").read_text())["dtype"] == "uint32"
    assert np.array_equal(np.fromfile(out, dtype=np.uint32), run["ids"])
    _refused(*_eval(capsys, run["folders"][-1], "--data", out, "--token-dtype", "uint16"),
             "--token-dtype uint16", "tokens.bin.json", "uint32")
    want, _ = reference_loss(load_hf(run["folders"][-1]), run["ids"], context=CONTEXT)
    assert _loss(tmp_path, capsys, run["folders"][-1], out) == pytest.approx(want, abs=1e-5)


def test_a_too_small_tokenizer_is_refused_showing_both_sizes_and_where_they_came_from(run, tmp_path, capsys):
    small = tmp_path / "small-tok"
    unigram_tokenizer(SMALL_VOCAB).save_pretrained(small)
    model, text = run["folders"][-1], run["root"] / "heldout.txt"
    _refused(*_eval(capsys, model, "--data", text, "--tokenizer", small),
             "1,500", "67,500", str(small), str(model), "config.json vocab_size", "--tokenizer")
    code, _, err = _eval(capsys, model, "--data", text, "--tokenizer", small, "--allow-vocab-mismatch")
    assert code == 0 and "warning" in err and "1,500" in err  # goes on only when asked, and says so


def test_padding_conventions_pass_and_a_wrong_size_does_not():
    from ckptmerge.evaluation.tokenizer_fit import vocab_verdict

    assert vocab_verdict(50_257, 50_257, 50_304) == "fits"        # nanoGPT: GPT-2 rounded up to 64
    assert vocab_verdict(32_100, 32_100, 32_128) == "fits"        # T5: rounded up to 128
    assert vocab_verdict(151_665, 151_643, 151_936) == "padded"   # Qwen2.5: more than one rounding: a warning
    assert vocab_verdict(32_002, 32_000, 32_000) == "padded"      # two added tokens past the rows: a warning
    assert vocab_verdict(SMALL_VOCAB, SMALL_VOCAB, BIG_VOCAB) == "mismatch"
    assert vocab_verdict(BIG_VOCAB, BIG_VOCAB, 32_000) == "mismatch"


def test_merge_carries_the_root_tokenizer_and_eval_needs_no_flag(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(run["run"]), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["tokenizer_from"] == {"folder": str(run["run"]), "where": "run directory"}
    assert (out / "tokenizer.json").read_bytes() == (run["run"] / "tokenizer.json").read_bytes()
    text = run["root"] / "heldout.txt"
    plain = _loss(tmp_path, capsys, out, text)
    explicit = _loss(tmp_path, capsys, out, text, "--tokenizer", run["run"])
    assert plain == explicit
    coeffs = [i["coefficient"] for i in manifest["inputs"]]
    want, _ = reference_loss(merged_hf(run["folders"], coeffs), run["ids"], context=CONTEXT)
    assert plain == pytest.approx(want, abs=1e-5)


def test_a_checkpoints_own_tokenizer_wins_over_the_root(run, tmp_path, capsys):
    import shutil

    local = tmp_path / "run2"
    shutil.copytree(run["run"], local)
    unigram_tokenizer(BIG_VOCAB).save_pretrained(local / "checkpoint-20")
    out = tmp_path / "merged2"
    assert main(["merge", str(local), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((out / "merge.json").read_text())["tokenizer_from"]["where"] == "checkpoint"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_empty_data_is_one_line_naming_the_input(run, tmp_path, capsys, kind):
    path = tmp_path / f"empty.{kind}"
    if kind == "txt":
        path.write_text("")
    elif kind == "jsonl":
        path.write_text("\n" + json.dumps({"text": ""}) + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    code, out, err = _eval(capsys, run["folders"][-1], "--data", path)
    _refused(code, out, err, str(path), "nothing to score")
    assert "cache" not in err and "--token-dtype" not in err


def test_an_empty_token_file_names_itself(run, tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _refused(*_eval(capsys, run["folders"][-1], "--data", empty, "--token-dtype", "uint32"), str(empty), "empty")


def test_a_tokenizer_folder_without_tokenizer_files_lists_what_was_looked_for(run, tmp_path, capsys):
    folder = tmp_path / "not-a-tokenizer"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here")
    _refused(*_eval(capsys, run["folders"][-1], "--data", run["root"] / "heldout.txt", "--tokenizer", folder),
             str(folder), "tokenizer.json", "tokenizer.model", "--tokenizer")


def test_watch_publishes_the_root_tokenizer_and_eval_needs_no_flag(run, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["watch", str(run["run"]), "-o", str(out), "--last", "2", "--every", "10", "--once",
                 "--settle-s", "0"]) == 0
    capsys.readouterr()
    current = out / "current"
    assert (current / "tokenizer.json").read_bytes() == (run["run"] / "tokenizer.json").read_bytes()
    assert json.loads((current / "merge.json").read_text())["tokenizer_from"]["where"] == "run directory"
    want, _ = reference_loss(merged_hf(run["folders"], [0.5, 0.5]), run["ids"], context=CONTEXT)
    assert _loss(tmp_path, capsys, current, run["root"] / "heldout.txt") == pytest.approx(want, abs=1e-5)


def test_padded_rows_fit_and_a_different_config_eos_is_a_warning(tmp_path):
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from ckptmerge.data.text_tokenizer import load_tokenizer
    from ckptmerge.evaluation.tokenizer_fit import check_tokenizer_fits

    unigram_tokenizer(SMALL_VOCAB).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == SMALL_VOCAB and tok.eos_id == 2
    for eos, warned in ((2, False), (1, True)):
        config = LlamaConfig(vocab_size=1536, hidden_size=8, intermediate_size=16, num_hidden_layers=1,  # 1,500 padded
                             num_attention_heads=2, num_key_value_heads=2, eos_token_id=eos, bos_token_id=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_tokenizer_fits(tok, LlamaForCausalLM(config), "m")
        assert any("eos_token_id" in str(w.message) for w in caught) == warned
        assert not any("size" in str(w.message) for w in caught)  # 1,536 rows = 1,500 rounded up to 512
