"""The HF Trainer callback keeps the same EMA as a hand-computed one over the same optimizer steps."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
