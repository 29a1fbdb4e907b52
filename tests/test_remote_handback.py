"""``merge --as-checkpoint`` with the output, the newest input, or both at a URL (docs/storage.md, "Writing: the
commit protocol" and "--as-checkpoint at a URL"), on the moto S3 server of ``tests/s3_server.py``.

Each hand-back is compared with the local ``--as-checkpoint`` output of the same merge (every file byte for byte,
``merge.json`` by its inputs and options) and with references that do not go through ckptmerge: the fp64 NumPy
mean of the saved weights, the newest checkpoint's own optimizer / trainer state as the test wrote it, and the
frameworks' own loaders (``transformers.from_pretrained``, ``torch.load``, ``torch.distributed.checkpoint.load``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from ckptmerge.cli.main import main
from ckptmerge.io import remote_handback
from ckptmerge.io.remote import Url, filesystem
from ckptmerge.io.remote_publish import LAST, POINTERS, _copy_rank
from conftest import reference_merge
from s3_server import SECRET, proxy, replace_on_first_read, s3, s3_server, upload  # noqa: F401 - fixtures
from test_remote_layouts import _listing_and_gets, _megatron, _nanogpt, _opt_state, _states, _torchtitan

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEPS = (10, 20, 30)  # the builders of tests/test_remote_layouts.py save these steps


# --- runs: (the folder to merge, the saved weights of each checkpoint as the merge names them) ---------------------

def _hf_gpt2(root: Path) -> tuple[Path, list[dict]]:
    """An HF Trainer run of a tiny GPT-2 (``save_pretrained``: tied ``lm_head`` left out) with the files the Trainer
    resumes from: optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin, trainer_state.json."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1,
                                                                 n_head=2))
    run, states = root / "run", []
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        folder = run / f"checkpoint-{step}"
        model.save_pretrained(folder)
        states.append(load_file(folder / "model.safetensors"))
        torch.save(_opt_state(states[-1]), folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        torch.save({"cpu_rng_state": torch.random.get_rng_state()}, folder / "rng_state.pth")
        torch.save({"output_dir": "run", "seed": 7}, folder / "training_args.bin")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"learning_rate": 1e-3 / step}]}))
    return run, states


def _deepspeed_zero0(root: Path) -> tuple[Path, list[dict]]:
    """DeepSpeed ZeRO 0 fp32 (``engine.save_checkpoint``'s names): ``global_stepN/mp_rank_00_model_states.pt`` with
    the module and the torch optimizer's state beside it, and ``latest`` naming the newest tag."""
    run, states = root / "run", _states()
    run.mkdir(parents=True)
    for step, state in zip(STEPS, states):
        tag = run / f"global_step{step}"
        tag.mkdir()
        torch.save({"module": {f"module.{k}": v for k, v in state.items()}, "global_steps": step,
                    "optimizer": _opt_state(state), "lr_scheduler": {"last_epoch": step}, "buffer_names": [],
                    "ds_config": {"train_batch_size": 4}, "ds_version": "0.16.4"}, tag / "mp_rank_00_model_states.pt")
    (run / "latest").write_text(f"global_step{STEPS[-1]}")
    return run, states


def _nanogpt_run(root: Path) -> tuple[Path, list[dict]]:
    run, states = root / "run", _states()
    run.mkdir(parents=True)
    _nanogpt(run, states)
    return run, states


def _torchtitan_run(root: Path) -> tuple[Path, list[dict]]:
    run, states = root / "run", _states()
    run.mkdir(parents=True)
    _torchtitan(run, states)
    return run / "checkpoint", states


BUILD = {"hf-gpt2": _hf_gpt2, "deepspeed-zero0": _deepspeed_zero0, "nanogpt": _nanogpt_run,
         "torchtitan": _torchtitan_run}
NEWEST = {"hf-gpt2": "checkpoint-30", "deepspeed-zero0": "global_step30", "nanogpt": "ckpt_2.pt",
          "torchtitan": "step-30"}


# --- what a hand-back must hold, by each framework's own loader --------------------------------------------------

def _assert_close(got: dict, want: dict, rename=lambda k: k) -> None:
    assert sorted(rename(k) for k in want) == sorted(got), (sorted(got), sorted(want))
    for name, value in want.items():
        np.testing.assert_allclose(got[rename(name)].to(torch.float64).numpy(), value, rtol=0, atol=1e-6, err_msg=name)


def _assert_same_tensors(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same_tensors(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def _check_hf_gpt2(out: Path, run: Path, mean: dict) -> None:
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(out)  # transformers' own loader of the hand-back
    _assert_close({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, mean)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        assert (out / name).read_bytes() == (run / "checkpoint-30" / name).read_bytes(), name


def _check_deepspeed_zero0(out: Path, run: Path, mean: dict) -> None:
    assert (out / "latest").read_text() == "global_step30"
    back = torch.load(out / "global_step30" / "mp_rank_00_model_states.pt", weights_only=False)
    saved = torch.load(run / "global_step30" / "mp_rank_00_model_states.pt", weights_only=False)
    _assert_close(back["module"], mean, lambda k: f"module.{k}")
    _assert_same_tensors(back["optimizer"], saved["optimizer"])
    assert back["global_steps"] == 30 and back["lr_scheduler"] == saved["lr_scheduler"]


def _check_nanogpt(out: Path, run: Path, mean: dict) -> None:
    back = torch.load(out / "ckpt_2.pt", weights_only=False)
    saved = torch.load(run / "ckpt_2.pt", weights_only=False)
    _assert_close(back["model"], mean, lambda k: f"_orig_mod.{k}")
    _assert_same_tensors(back["optimizer"], saved["optimizer"])
    assert int(back["iter_num"]) == 30 and back["config"] == saved["config"]


def _check_torchtitan(out: Path, run: Path, mean: dict) -> None:
    state = {**{k: torch.zeros_like(torch.from_numpy(v).float()) for k, v in mean.items()},
             "optimizer": {"lr": torch.tensor(0.0)}, "train_state": {"step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=out / "step-30")  # torch's own DCP loader
    _assert_close({k: v for k, v in state.items() if k in mean}, mean)
    assert float(state["optimizer"]["lr"]) == pytest.approx(0.05) and int(state["train_state"]["step"]) == 30


CHECK = {"hf-gpt2": _check_hf_gpt2, "deepspeed-zero0": _check_deepspeed_zero0, "nanogpt": _check_nanogpt,
         "torchtitan": _check_torchtitan}


# --- helpers ---------------------------------------------------------------------------------------------------

@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """The system temporary folder for this test: the staging folders and the hand-back's copies go there."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _ours(temp: Path) -> list[str]:
    """What ckptmerge left in the temporary folder: staging folders, copies of remote checkpoints."""
    return [p.name for p in temp.iterdir() if "ckptmerge" in p.name]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _download(s3, url: str, dest: Path) -> Path:
    dest.mkdir()
    s3.invalidate_cache()
    s3.get(url.removeprefix("s3://") + "/", str(dest) + "/", recursive=True)
    return dest


def _assert_same_output(local: Path, got: Path, *, inputs: list[str]) -> None:
    """Every file byte for byte but ``merge.json``, whose inputs (``inputs``: their paths) and options must match."""
    want, have = _files(local), _files(got)
    assert sorted(have) == sorted(want)
    for name in want:
        if name != "merge.json":
            assert have[name] == want[name], name
    a, b = json.loads(want["merge.json"]), json.loads(have["merge.json"])
    assert a["options"] == b["options"] and a["options"]["as_checkpoint"] is True
    assert [i["path"] for i in b["inputs"]] == inputs
    drop = ("path", "content_hash")
    assert [{k: v for k, v in i.items() if k not in drop} for i in a["inputs"]] == \
           [{k: v for k, v in i.items() if k not in drop} for i in b["inputs"]]


def _merge(*args: str) -> int:
    return main(["merge", *map(str, args), "--last", "2", "--as-checkpoint", "--quiet"])


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    assert SECRET not in err[0] and "Traceback" not in err[0]
    return err[0]


def _nothing_at(s3, url: str) -> bool:
    """No object at ``url`` and no temporary beside it."""
    s3.invalidate_cache()
    path = url.removeprefix("s3://")
    parent, name = path.rsplit("/", 1)
    return not s3.find(path) and not [k for k in s3.find(parent, withdirs=True) if f".{name}.tmp-" in k]


# --- (a) a local run handed back to a URL ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BUILD))
def test_a_hand_back_to_a_url_equals_the_local_hand_back(tmp_path, s3, temp, monkeypatch, kind):
    run, states = BUILD[kind](tmp_path)
    mean = reference_merge(states[1:], [0.5, 0.5])
    assert _merge(run, "-o", tmp_path / "local") == 0
    url = f"s3://handback/{kind}-to-url"
    fs = filesystem(Url("s3", "handback"))  # the library's own (cached) filesystem: record the commit's copies
    copied, original = [], fs.copy
    monkeypatch.setattr(fs, "copy", lambda src, dst, **kw: (copied.append(dst), original(src, dst, **kw))[1])
    if not s3.exists("handback"):
        s3.mkdir("handback")
    assert _merge(run, "-o", url) == 0
    got = _download(s3, url, tmp_path / "got")
    _assert_same_output(tmp_path / "local", got, inputs=[str((run / n).resolve()) for n in _window(kind)])
    CHECK[kind](got, run, mean)
    keys = [k.removeprefix(url.removeprefix("s3://") + "/") for k in copied]
    assert sorted(keys) == sorted(_files(got))
    _assert_commit_order(keys)
    assert not _ours(temp)  # the staging folder is gone


def _window(kind: str) -> list[str]:
    return {"hf-gpt2": ["checkpoint-20", "checkpoint-30"], "deepspeed-zero0": ["global_step20", "global_step30"],
            "nanogpt": ["ckpt_1.pt", "ckpt_2.pt"], "torchtitan": ["step-20", "step-30"]}[kind]


def _assert_commit_order(keys: list[str]) -> None:
    """The order the commit copied the objects in: what a trainer keys its resume on comes after what it implies."""
    at = {k: i for i, k in enumerate(keys)}
    pointers = [k for k in keys if k.rsplit("/", 1)[-1] in POINTERS]
    for pointer in pointers:
        folder = pointer.rsplit("/", 1)[0] + "/" if "/" in pointer else ""
        before = [k for k in keys if k.startswith(folder) and k not in pointers and k not in LAST]
        assert all(at[k] < at[pointer] for k in before), (pointer, keys)
    assert keys[-len([n for n in LAST if n in at]):] == [n for n in LAST if n in at]  # merge.json, config.json last
    if "latest" in at:  # DeepSpeed's tag pointer: after every file of the tag it names
        assert all(at[k] < at["latest"] for k in keys if k.startswith("global_step30/"))
    if "trainer_state.json" in at:  # HF Trainer: without it a resume restarts at step 0
        assert all(at[n] < at["trainer_state.json"] for n in ("optimizer.pt", "scheduler.pt", "rng_state.pth",
                                                               "training_args.bin", "model.safetensors"))
    for meta in [k for k in keys if k.endswith("/.metadata")]:  # a DCP folder: its data before its metadata
        assert all(at[k] < at[meta] for k in keys if k.startswith(meta.removesuffix(".metadata")) and k != meta)


def test_the_copy_order_puts_pointers_after_what_they_name():
    """Names that sort before their folder's data (``.metadata``) or after a tag they name (a custom DeepSpeed tag
    ``zz``) are still copied after it: the order is the rule's, not the alphabet's."""
    keys = ["latest", "zz/mp_rank_00_model_states.pt", "zz/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "step-3/.metadata", "step-3/__0_0.distcp", "trainer_state.json", "training_args.bin", "optimizer.pt",
            "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "merge.json",
            "config.json", "ckptmerge.json", "fsdp/.metadata", "fsdp/__0_0.distcp"]
    order = sorted(keys, key=_copy_rank)
    assert order[-2:] == ["merge.json", "config.json"]
    assert order.index("latest") > max(order.index(k) for k in keys if k.startswith("zz/"))
    assert order.index("step-3/.metadata") > order.index("step-3/__0_0.distcp")
    assert order.index("trainer_state.json") > max(order.index(k) for k in ("optimizer.pt", "training_args.bin",
                                                                             "model.safetensors", "fsdp/.metadata"))
    assert order.index("model.safetensors.index.json") > order.index("model-00001-of-00002.safetensors")
    assert order.index("model.safetensors") > order.index("optimizer.pt")  # weights after the trainer state


# --- (b) the run itself at a URL -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BUILD))
def test_a_newest_checkpoint_at_a_url_is_handed_back_like_the_local_one(tmp_path, s3, proxy, temp, kind):
    run, states = BUILD[kind](tmp_path)
    mean = reference_merge(states[1:], [0.5, 0.5])
    assert _merge(run, "-o", tmp_path / "local") == 0
    where = f"handback/{kind}-run"
    upload(s3, run, where)
    inputs = [f"s3://{where}/{n}" for n in _window(kind)]
    for out in (tmp_path / "from-url", f"s3://handback/{kind}-from-url"):
        proxy.requests.clear()
        assert _merge(f"s3://{where}", "-o", out) == 0
        got = out if isinstance(out, Path) else _download(s3, out, tmp_path / "from-url-to-url")
        _assert_same_output(tmp_path / "local", got, inputs=inputs)
        CHECK[kind](got, run, mean)
        assert not _ours(temp)  # the local copy of the newest checkpoint is gone, the staging too
        _, whole, _, _ = _listing_and_gets(proxy.requests)
        older = [k for k in whole if f"/{_window(kind)[0]}" in k and not k.endswith((".json", ".metadata"))]
        assert not older, older  # the other input is read by ranges, never copied
        newest = {k for k in whole if f"/{NEWEST[kind]}" in k}
        assert newest == {f"/{where}/{NEWEST[kind]}" + (f"/{k}" if k else "") for k in _objects(run / NEWEST[kind])}


def _objects(path: Path) -> list[str]:
    return [""] if path.is_file() else [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]


# --- (c) the newest checkpoint changes while it is merged or copied ---------------------------------------------

def test_a_newest_checkpoint_replaced_during_the_merge_publishes_nothing(tmp_path, s3, temp, monkeypatch, capsys):
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    run, states = _hf_gpt2(tmp_path)
    upload(s3, run, "handback/replaced")
    capsys.readouterr()  # save_pretrained's progress bars
    save_file({k: v + 1 for k, v in states[0].items()}, tmp_path / "other.safetensors")
    newest = "handback/replaced/checkpoint-30/model.safetensors"
    replaced = replace_on_first_read(monkeypatch, RemoteSafetensorsReader, s3, tmp_path / "other.safetensors", newest)
    for out in (str(tmp_path / "out"), "s3://handback/replaced-out"):
        replaced.clear()
        s3.put_file(str(run / "checkpoint-30" / "model.safetensors"), newest)
        assert _merge("s3://handback/replaced", "-o", out) == 2
        line = _error_line(capsys)
        assert "s3://handback/replaced/checkpoint-30" in line and "changed while it was being merged" in line, line
        assert replaced and str(temp) not in line
    assert not (tmp_path / "out").exists() and _nothing_at(s3, "s3://handback/replaced-out")
    assert not _ours(temp)


def test_a_newest_object_replaced_during_its_copy_publishes_nothing(tmp_path, s3, temp, monkeypatch, capsys):
    """optimizer.pt (never pinned by the merge, which reads only the weights) changes while it is copied."""
    run, _ = _hf_gpt2(tmp_path)
    upload(s3, run, "handback/copying")
    capsys.readouterr()  # save_pretrained's progress bars
    torch.save({"state": {}, "param_groups": []}, tmp_path / "other.pt")
    fetch = remote_handback._fetch

    def fetch_then_replace(tree, targets):
        fetch(tree, targets)
        s3.put_file(str(tmp_path / "other.pt"), "handback/copying/checkpoint-30/optimizer.pt")

    monkeypatch.setattr(remote_handback, "_fetch", fetch_then_replace)
    assert _merge("s3://handback/copying", "-o", "s3://handback/copying-out") == 2
    line = _error_line(capsys)
    assert "s3://handback/copying/checkpoint-30/optimizer.pt" in line and "changed while it was being copied" in line
    assert _nothing_at(s3, "s3://handback/copying-out") and not _ours(temp)


def test_a_newest_checkpoint_replaced_between_its_copy_and_the_merge_publishes_nothing(tmp_path, s3, temp,
                                                                                       monkeypatch, capsys):
    """The weights change after the copy and before the merge pins them: the merge reads (and pins) the new weights,
    which were not saved with the state copied, so the hand-back refuses."""
    from ckptmerge.merging import handback

    run, states = _hf_gpt2(tmp_path)
    upload(s3, run, "handback/between")
    capsys.readouterr()  # save_pretrained's progress bars
    save_file({k: v + 1 for k, v in states[0].items()}, tmp_path / "other.safetensors")
    check = handback.check_write_back

    def check_then_replace(newest, out_dtype=None):
        check(newest, out_dtype)
        s3.put_file(str(tmp_path / "other.safetensors"), "handback/between/checkpoint-30/model.safetensors")

    monkeypatch.setattr(handback, "check_write_back", check_then_replace)
    assert _merge("s3://handback/between", "-o", tmp_path / "out") == 2
    line = _error_line(capsys)
    assert "s3://handback/between/checkpoint-30" in line and "between its copy for --as-checkpoint and the merge" in line
    assert not (tmp_path / "out").exists() and not _ours(temp)


# --- (d) refusals before anything is written --------------------------------------------------------------------

@pytest.fixture
def no_copy(monkeypatch) -> list:
    """Records every copy of a remote checkpoint the hand-back makes (none, for a refusal the listing answers)."""
    fetched, fetch = [], remote_handback._fetch
    monkeypatch.setattr(remote_handback, "_fetch", lambda tree, targets: (fetched.append(tree.root), fetch(tree, targets)))
    return fetched


def test_a_layout_without_a_hand_back_is_refused_before_anything_is_copied(tmp_path, s3, temp, no_copy, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _megatron(run, _states())
    upload(s3, run, "handback/megatron")
    for out in (str(tmp_path / "out"), "s3://handback/megatron-out"):
        assert _merge("s3://handback/megatron", "-o", out) == 2
        line = _error_line(capsys)
        assert "s3://handback/megatron/iter_0000030" in line and "not supported for megatron" in line, line
    assert no_copy == [] and not (tmp_path / "out").exists() and _nothing_at(s3, "s3://handback/megatron-out")
    assert not _ours(temp)


def test_a_half_precision_deepspeed_hand_back_at_a_url_is_refused_before_anything_is_copied(tmp_path, s3, temp,
                                                                                            no_copy, capsys):
    run, _ = _deepspeed_zero0(tmp_path)
    upload(s3, run, "handback/ds-bf16")
    assert main(["merge", "s3://handback/ds-bf16", "--last", "2", "--as-checkpoint", "--out-dtype", "bfloat16",
                 "-o", "s3://handback/ds-bf16-out", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "s3://handback/ds-bf16/global_step30" in line and "drop --out-dtype bfloat16" in line, line
    assert no_copy == [] and _nothing_at(s3, "s3://handback/ds-bf16-out") and not _ours(temp)


def test_a_refusal_found_in_the_copy_names_the_url(tmp_path, s3, temp, no_copy, capsys):
    """ZeRO 0 fp16 keeps fp32 masters inside the model-states file: only its payload tells, so the checkpoint is
    copied, refused, and the copy removed; the line names the object's URL, never the temporary."""
    run, states = _deepspeed_zero0(tmp_path)
    w = states[-1]
    torch.save({"module": {k: v.half() for k, v in w.items()}, "global_steps": 30,
                "optimizer": {"fp32_groups_flat": [torch.cat([v.reshape(-1) for v in w.values()])]}},
               run / "global_step30" / "mp_rank_00_model_states.pt")
    upload(s3, run, "handback/ds-masters")
    assert _merge("s3://handback/ds-masters", "-o", "s3://handback/ds-masters-out") == 2
    line = _error_line(capsys)
    assert "s3://handback/ds-masters/global_step30/mp_rank_00_model_states.pt" in line and "fp32_groups_flat" in line
    assert str(temp) not in line and "ckptmerge-handback" not in line, line
    assert len(no_copy) == 1 and _nothing_at(s3, "s3://handback/ds-masters-out") and not _ours(temp)


def test_a_local_checkpoint_without_a_hand_back_is_refused_before_the_upload(tmp_path, s3, temp, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for i, state in enumerate(_states()):  # bare .safetensors files: no trainer checkpoint to hand back
        save_file(state, run / f"step-{STEPS[i]}.safetensors")
    if not s3.exists("handback"):
        s3.mkdir("handback")
    assert _merge(run, "-o", "s3://handback/plain-out") == 2
    line = _error_line(capsys)
    assert "step-30.safetensors" in line and "needs a trainer checkpoint" in line, line
    assert _nothing_at(s3, "s3://handback/plain-out") and not _ours(temp)


def test_a_merge_failing_after_the_copy_removes_it(tmp_path, s3, temp, capsys):
    """The inputs disagree on their tensors (found when the merge is planned, after the newest was copied): one line,
    nothing published, and the copy is gone once the command returns."""
    run, states = _hf_gpt2(tmp_path)
    save_file({**states[1], "extra.weight": torch.ones(2)}, run / "checkpoint-20" / "model.safetensors")
    upload(s3, run, "handback/mismatch")
    capsys.readouterr()
    assert _merge("s3://handback/mismatch", "-o", "s3://handback/mismatch-out") == 2
    line = _error_line(capsys)
    assert "extra.weight" in line, line
    assert _nothing_at(s3, "s3://handback/mismatch-out") and not _ours(temp)
