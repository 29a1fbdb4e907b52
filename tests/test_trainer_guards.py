"""No merge exits 0 with an output that lacks the inputs' weights; pointers are skipped, not refused."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from trainer_checks import merged_tensors, run_cli


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(16, 8, generator=g), "layer.bias": torch.randn(16, generator=g)}


def test_weights_under_an_unknown_key_beside_a_scalar_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20, 30):
        torch.save({"weights": _weights(step), "loss": torch.tensor(1.0 / step)}, run / f"step_{step}.pt")
    code, _ = run_cli("merge", run, "-o", tmp_path / "out", "--last", "3", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()


def test_a_merge_of_scalars_only_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20, 30):
        torch.save({"loss": torch.tensor(1.0 / step), "lr": torch.tensor(0.1)}, run / f"step_{step}.pt")
    code, _ = run_cli("merge", run, "-o", tmp_path / "out", "--last", "3", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()


def test_pointers_and_copies_are_listed_as_skipped(tmp_path):
    run = tmp_path / "checkpoints"
    (run / "global_step10").mkdir(parents=True)
    torch.save({"module": _weights(1), "global_steps": 10}, run / "global_step10" / "mp_rank_00_model_states.pt")
    (run / "latest").write_text("global_step10")
    (run / "newest.pt").symlink_to(run / "global_step10" / "mp_rank_00_model_states.pt")
    code, table = run_cli("inspect", run)
    assert code == 0
    assert "skipped latest: DeepSpeed's pointer" in table and "1 checkpoints" in table


def _wrapped(seed: int, wrap) -> dict[str, torch.Tensor]:
    return {wrap(name): t for name, t in _weights(seed).items()}


def test_fsdp1_and_fabric_wrappers_are_stripped_in_torch_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    wrap = lambda name: "_forward_module._fsdp_wrapped_module." + name.replace(".", "._checkpoint_wrapped_module.", 1)
    for step in (10, 20, 30):
        torch.save({"model": _wrapped(step, wrap)}, run / f"step_{step}.pt")
    code, _ = run_cli("merge", run, "-o", tmp_path / "out", "--last", "3", "--quiet")
    assert code == 0
    merged = merged_tensors(tmp_path / "out")
    assert sorted(merged) == ["layer.bias", "layer.weight"]
    want = sum(_weights(s)["layer.weight"].double() for s in (10, 20, 30)) / 3
    torch.testing.assert_close(merged["layer.weight"].double(), want, rtol=0, atol=1e-6)


def test_names_left_under_a_wrapper_are_refused_with_the_names(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        (run / f"step_{step}").mkdir(parents=True)
        save_file(_wrapped(step, lambda name: "state_dict.model." + name), run / f"step_{step}" / "model.safetensors")
    code, _ = run_cli("merge", run, "-o", tmp_path / "out", "--last", "3", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "state_dict.model.layer.bias" in capsys.readouterr().err
