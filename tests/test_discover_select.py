"""Series discovery (names people use, metadata) and window selection."""

import json

import pytest
from conftest import make_state, write_checkpoint, write_series

from ckptmerge import discover, parse_step, select_last, select_range, select_steps
from ckptmerge.errors import DiscoveryError, SelectionError


@pytest.mark.parametrize("name,step", [
    ("step-1000", 1000), ("step_1000", 1000), ("step1000", 1000), ("checkpoint-1000", 1000),
    ("iter_0001000", 1000), ("ckpt_1000.pt", 1000), ("model_001000.safetensors", 1000),
    ("global_step250", 250), ("step-000000", 0), ("final", None), ("model.safetensors", None), ("run-2024", None),
])
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_orders_by_step_not_by_name_and_ignores_non_checkpoints(tmp_path):
    run = tmp_path / "run"
    write_series(run, [make_state(i) for i in range(3)], steps=[900, 10000, 1000], name="checkpoint-{step}")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "logs").mkdir()
    (run / ".step-5.tmp-abc").mkdir()  # an interrupted write: dot-names are never read
    assert [r.step for r in discover(run).checkpoints] == [900, 1000, 10000]


def test_mixed_file_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "ckpt_200", make_state(0), "pt-nested")
    write_checkpoint(run / "model_000100", make_state(1), "safetensors-file")
    refs = discover(run).checkpoints
    assert [(r.step, r.layout) for r in refs] == [(100, "safetensors"), (200, "torch")]


def test_unparsable_names_error_or_are_skipped_explicitly(tmp_path):
    run = tmp_path / "run"
    write_series(run, [make_state(i) for i in range(2)])
    write_checkpoint(run / "final", make_state(3), "hf-safetensors")
    with pytest.raises(DiscoveryError, match="final.*--skip-unparsable"):
        discover(run)
    found = discover(run, skip_unparsable=True)
    assert [r.step for r in found.checkpoints] == [100, 200]
    assert [p.name for p, _ in found.skipped] == ["final"]


def test_duplicate_steps_are_an_error_naming_both(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "step-100", make_state(0), "hf-safetensors")
    write_checkpoint(run / "ckpt_100", make_state(1), "pt-nested")
    with pytest.raises(DiscoveryError, match="step 100: .*ckpt_100.pt.*step-100"):
        discover(run)


def test_metadata_gives_tokens_and_lr(tmp_path):
    run = tmp_path / "run"
    paths = write_series(run, [make_state(i) for i in range(3)], name="checkpoint-{step}")
    state = {"global_step": 100, "num_input_tokens_seen": 51200,
             "log_history": [{"learning_rate": 3e-3, "step": 50}, {"learning_rate": 2.5e-3, "step": 100}]}
    (paths[0] / "trainer_state.json").write_text(json.dumps(state))
    (paths[1] / "ckptmerge.json").write_text(json.dumps({"step": 200, "tokens_seen": 102400, "lr": 1e-3}))
    refs = discover(run, tokens_per_step=999).checkpoints
    assert (refs[0].tokens_seen, refs[0].lr) == (51200, 2.5e-3)
    assert (refs[1].tokens_seen, refs[1].lr) == (102400, 1e-3)
    assert refs[2].tokens_seen == 300 * 999 and refs[2].lr is None


@pytest.fixture
def refs(tmp_path):
    steps = [100, 200, 300, 400, 500, 600, 800, 1000]
    write_series(tmp_path / "run", [make_state(0)] * len(steps), steps=steps)
    return discover(tmp_path / "run", tokens_per_step=512).checkpoints


def test_select_last_with_step_and_token_spacing(refs):
    assert [r.step for r in select_last(refs, 3)] == [600, 800, 1000]
    assert [r.step for r in select_last(refs, 3, every_steps=200)] == [600, 800, 1000]
    assert [r.step for r in select_last(refs, 3, every_steps=200, end_step=600)] == [200, 400, 600]
    assert [r.step for r in select_last(refs, 2, every_tokens=400 * 512)] == [600, 1000]


def test_select_last_errors_explain_the_grid(refs):
    with pytest.raises(SelectionError, match=r"no checkpoint at steps \[700\].*multiples of 100"):
        select_last(refs, 3, every_steps=300, end_step=1000)
    with pytest.raises(SelectionError, match="only 8 exist"):
        select_last(refs, 9)
    with pytest.raises(SelectionError, match="not a checkpoint"):
        select_last(refs, 2, end_step=700)


def test_explicit_steps_and_ranges(refs):
    assert [r.step for r in select_steps(refs, [800, 200])] == [200, 800]
    assert [r.step for r in select_range(refs, 250, 600)] == [300, 400, 500, 600]
    with pytest.raises(SelectionError, match="700"):
        select_steps(refs, [700])
