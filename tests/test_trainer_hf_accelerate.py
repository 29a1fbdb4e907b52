"""HF Trainer (final model at the run-dir root), Accelerate automatic naming, nanoGPT files: real save code."""

from __future__ import annotations

import pytest
import torch

from trainer_checks import assert_merge_matches, fp64_mean, run_cli

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.arange(i, i + 12) % 64
        return {"input_ids": ids, "labels": ids}


def _hf_args(out, max_steps, **extra):
    return transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=4, save_strategy="steps",
                                          per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=4,
                                          report_to=[], use_cpu=True, **extra)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "run"
    trainer = transformers.Trainer(model=_tiny_llama(), args=_hf_args(out, 16), train_dataset=_Tokens())
    trainer.train()
    trainer.save_model()  # the final model at the run-dir root, beside checkpoint-N/
    return out


def test_hf_trainer_with_final_model_at_root(hf_run, tmp_path):
    assert (hf_run / "model.safetensors").is_file()
    states = [transformers.LlamaForCausalLM.from_pretrained(hf_run / f"checkpoint-{s}").state_dict() for s in (8, 12, 16)]
    assert_merge_matches(hf_run, tmp_path / "out", fp64_mean(states), [4, 8, 12, 16], "hf-trainer",
                         key_map=lambda k: k)
    code, table = run_cli("inspect", hf_run)
    assert "skipped model.safetensors: the final model" in table


def test_accelerate_automatic_naming_reads_the_true_step(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import ProjectConfiguration

    project = tmp_path / "project"
    acc = accelerate.Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(project), automatic_checkpoint_naming=True, total_limit=None))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    states = []
    for step in range(1, 21):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            acc.save_state()
            states.append({k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()})
    run_dir = project / "checkpoints"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"checkpoint_{i}" for i in range(4)]
    loaded = []
    for i in (1, 2, 3):  # Accelerate's own loader
        acc.load_state(str(run_dir / f"checkpoint_{i}"))
        loaded.append({k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()})
    for a, b in zip(loaded, states[1:]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert_merge_matches(run_dir, tmp_path / "out", fp64_mean(loaded), [5, 10, 15, 20], "accelerate")


def _nanogpt_series(run_dir, compiled: bool):
    """nanoGPT train.py's checkpoint dict, saved with torch.save under its own keys and types."""
    run_dir.mkdir()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Linear(8, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for it in range(1, 41):
        loss = model(torch.randint(0, 32, (4, 6))).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if it % 10 == 0:
            sd = model.state_dict()
            sd = {f"_orig_mod.{k}": v for k, v in sd.items()} if compiled else sd
            torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": {"n_layer": 1}, "iter_num": it,
                        "best_val_loss": torch.tensor(2.5 - it / 100), "config": {"lr": 0.05}},
                       run_dir / f"ckpt_{it // 10}.pt")  # names that do not carry the step


@pytest.mark.parametrize("compiled", [False, True])
def test_nanogpt_files_merge_the_weights_not_best_val_loss(tmp_path, compiled):
    run_dir = tmp_path / "out"
    _nanogpt_series(run_dir, compiled)
    states = [torch.load(run_dir / f"ckpt_{i}.pt", weights_only=False)["model"] for i in (2, 3, 4)]
    states = [{k.removeprefix("_orig_mod."): v for k, v in s.items()} for s in states]
    assert_merge_matches(run_dir, tmp_path / "merged", fp64_mean(states), [10, 20, 30, 40], "nanogpt")


class _StartProbe(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_step = getattr(self, "first_step", state.global_step)


def test_hf_trainer_resumes_from_the_merge(hf_run, tmp_path):
    out = tmp_path / "merged"
    code, _ = run_cli("merge", hf_run, "-o", out, "--last", "3", "--schedule", "sma", "--as-checkpoint", "--quiet")
    assert code == 0
    reference = fp64_mean([transformers.LlamaForCausalLM.from_pretrained(hf_run / f"checkpoint-{s}").state_dict()
                           for s in (8, 12, 16)])
    probe = _StartProbe()
    trainer = transformers.Trainer(model=_tiny_llama(), args=_hf_args(tmp_path / "resumed", 20),
                                   train_dataset=_Tokens(), callbacks=[probe])
    trainer.train(resume_from_checkpoint=str(out))  # HF Trainer's own resume
    assert probe.first_step == 16 and trainer.state.global_step == 20
    for name, want in reference.items():
        torch.testing.assert_close(probe.weights[name].double(), torch.from_numpy(want), rtol=0, atol=1e-5)
