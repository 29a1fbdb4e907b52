"""The HF Trainer callback keeps the same EMA as a hand-computed one over the same optimizer steps."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eval_reference import reference_windows, transformers_losses  # noqa: E402

from ckptmerge.evaluation.evaluator import load_model  # noqa: E402
from ckptmerge.online import EMA  # noqa: E402
from ckptmerge.online.hf_callback import AveragingCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 32, (16,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


class Recorder(transformers.TrainerCallback):
    """Reference: the weights after each optimizer step, folded into an fp64 EMA by hand."""

    def __init__(self, decay):
        self.decay, self.ema, self.steps = decay, None, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        current = {k: v.detach().double().clone() for k, v in model.named_parameters()}
        self.ema = current if self.ema is None else {k: self.decay * self.ema[k] + (1 - self.decay) * current[k]
                                                     for k in current}
        self.steps.append(state.global_step)


def test_trainer_callback_matches_hand_computed_ema_and_saves_averaged_folders(tmp_path):
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, learning_rate=5e-3, save_steps=3,
                                          save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True,
                                          dataloader_num_workers=0, seed=0)
    averaging, recorder = AveragingCallback(EMA(0.6)), Recorder(0.6)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[averaging, recorder]).train()

    assert recorder.steps == [1, 2, 3, 4, 5, 6] and averaging.averager.n_averaged == 6
    got = averaging.averager.averaged_state_dict()
    for name, want in recorder.ema.items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "checkpoint-3" / "averager_state.pt").is_file()
    saved = load_model(tmp_path / "checkpoint-6" / "averaged")
    torch.testing.assert_close(saved.model.embed_tokens.weight, got["model.embed_tokens.weight"])
    # the live model kept its training weights
    assert not torch.equal(model.model.embed_tokens.weight.detach(), got["model.embed_tokens.weight"])


def test_trainer_callback_under_ddp_updates_every_rank_saves_once_and_resumes(tmp_path):
    import socket

    import hf_ddp_runs
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(hf_ddp_runs.worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for seen in ranks:
        assert (seen["world_size"], seen["ddp"], seen["steps"]) == (2, "DistributedDataParallel", [1, 2, 3, 4])
        for name, want in seen["reference"].items():
            torch.testing.assert_close(seen["averaged"][name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(seen["resumed"][name], seen["averaged"][name], rtol=0, atol=1e-6, msg=name)
    for name, value in ranks[0]["averaged"].items():
        assert torch.equal(value, ranks[1]["averaged"][name]), name  # DDP: every rank holds the same average
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("averager_state*")) == ["averager_state.pt"]  # rank 0 alone
    saved = load_model(checkpoint / "averaged")
    torch.testing.assert_close(saved.model.embed_tokens.weight, ranks[0]["averaged"]["model.embed_tokens.weight"])


def _held_out_text(path):
    """A held-out text file; with the byte tokenizer its tokens are exactly its UTF-8 bytes."""
    g = torch.Generator().manual_seed(7)
    words = ["merge", "average", "weights", "loss", "step", "tokens", "model", "train"]
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (200,), generator=g))
    path.write_text(text)
    return path


class WeightsAt(transformers.TrainerCallback):
    """Reference: the training weights after each optimizer step (fp64), and a hand-folded fp64 EMA of them."""

    def __init__(self, decay):
        self.decay, self.weights, self.ema = decay, {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        current = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
        previous = self.ema.get(state.global_step - 1)
        self.weights[state.global_step] = current
        self.ema[state.global_step] = current if previous is None else {
            k: self.decay * previous[k] + (1 - self.decay) * current[k] for k in current}


def test_trainer_callback_logs_periodic_eval_of_average_and_raw_through_trainer_log(tmp_path, monkeypatch):
    from ckptmerge.data.tokenizer import save_hf_tokenizer
    from ckptmerge.errors import ConfigError

    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    save_hf_tokenizer(tmp_path / "tok")  # the model's own tokenizer reaches the callback as processing_class
    held = _held_out_text(tmp_path / "held.txt")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=5e-2, save_strategy="no", logging_strategy="steps",
                                          logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0)
    before, after = WeightsAt(0.6), WeightsAt(0.6)
    averaging = AveragingCallback(EMA(0.6), save_averaged=False, eval_every=2, data=[str(held)], tokens=128)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[before, averaging, after],
                                   data_collator=transformers.default_data_collator, processing_class=tokenizer)
    with pytest.raises(ConfigError, match="attach"):  # no trainer to log through: refused before any step
        trainer.train()
    averaging.attach(trainer)
    assert trainer.callback_handler.callbacks.count(averaging) == 1
    trainer.train()

    key = f"eval/merged/ema/{held.name}"
    logged = {e["step"]: e for e in trainer.state.log_history if key + "/loss" in e}
    assert sorted(logged) == [2, 4]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]  # training logs kept
    windows = reference_windows(torch.tensor(list(held.read_bytes())), n_windows=128 // 32, context=32)
    for step, entry in logged.items():
        raw = transformers_losses(config, before.weights[step], windows)
        merged = transformers_losses(config, before.ema[step], windows)
        assert abs(entry[f"eval/raw/{held.name}/loss"] - raw.mean()) < 1e-5
        assert abs(entry[key + "/loss"] - merged.mean()) < 1e-5
        assert abs(entry[key + "/delta_vs_raw"] - (merged - raw).mean()) < 1e-5
        assert abs(entry[key + "/delta_vs_raw_se"] - (merged - raw).std() / 2) < 1e-5  # sqrt(4 windows)
        assert abs(entry[key + "/bits_per_byte"] - merged.mean() / math.log(2)) < 1e-5  # one byte per token
        assert entry[key + "/delta_vs_raw"] != 0  # the average and the training weights differ at step 2 and 4
        for name, value in before.weights[step].items():  # the training weights came back after the swap
            assert torch.equal(after.weights[step][name], value), name
