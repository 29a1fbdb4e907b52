"""Megatron's weighted merge inputs: ``ckptmerge merge a:0.3 b:0.7 -o OUT`` against a fp64 NumPy weighted sum."""

import json

import numpy as np
import pytest
from conftest import make_state, reference_merge, write_checkpoint

from ckptmerge.cli.main import main as cli
from ckptmerge.errors import ConfigError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.recipe import split_input_weights


@pytest.fixture
def three(tmp_path):
    """Three HF safetensors checkpoints at steps 100, 200, 300: (paths, states)."""
    states = [make_state(seed, step=100 * (seed + 1)) for seed in range(3)]
    paths = [write_checkpoint(tmp_path / "run" / f"step-{100 * (i + 1):06d}", s, "hf-safetensors")
             for i, s in enumerate(states)]
    return paths, states


def merged(out):
    reader = open_checkpoint(out)
    return {name: reader.get(name) for name in reader.keys()}  # noqa: SIM118 (a reader, not a dict)


def assert_equals_reference(out, states, coeffs):
    expected = reference_merge(states, coeffs)
    got = merged(out)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].double().numpy(), value, rtol=1e-6, atol=1e-6, err_msg=name)
    return json.loads((out / "merge.json").read_text())


def test_path_weight_inputs_merge_to_the_weighted_sum(three, tmp_path):
    paths, states = three
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[0]}:0.2", f"{paths[1]}:0.3", f"{paths[2]}:0.5", "-o", str(out), "--quiet"]) == 0
    manifest = assert_equals_reference(out, states, [0.2, 0.3, 0.5])
    assert [i["coefficient"] for i in manifest["inputs"]] == pytest.approx([0.2, 0.3, 0.5], abs=1e-12)
    assert manifest["recipe"]["schedule"] == "custom"


def test_each_weight_stays_with_its_path_in_any_order(three, tmp_path):
    paths, states = three
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[2]}:0.5", f"{paths[0]}:0.2", f"{paths[1]}:0.3", "-o", str(out), "--quiet"]) == 0
    manifest = assert_equals_reference(out, states, [0.2, 0.3, 0.5])
    assert [i["step"] for i in manifest["inputs"]] == [100, 200, 300]


def test_path_weights_equal_the_custom_schedule(three, tmp_path):
    paths, _ = three
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(["merge", f"{paths[0]}:0.25", f"{paths[2]}:0.75", "-o", str(a), "--quiet"]) == 0
    assert cli(["merge", str(paths[0]), str(paths[2]), "--schedule", "custom:weights=0.25/0.75", "-o", str(b),
                "--quiet"]) == 0
    for name, value in merged(a).items():
        assert value.equal(merged(b)[name]), name


def test_normalize_rescales_the_weights_as_megatron_does(three, tmp_path, capsys):
    paths, states = three
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[0]}:3", f"{paths[1]}:1", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--normalize" in err and err.count("\n") == 1
    assert not out.exists()
    assert cli(["merge", f"{paths[0]}:3", f"{paths[1]}:1", "-o", str(out), "--normalize", "--quiet"]) == 0
    assert_equals_reference(out, states[:2], [0.75, 0.25])


def test_colons_in_paths_only_a_trailing_number_after_an_existing_input_is_a_weight(tmp_path):
    named = tmp_path / "ckpt:5"  # a folder whose name ends in :NUMBER is a path, not a weight
    named.mkdir()
    assert split_input_weights([str(named)]) == ([str(named)], None)
    assert split_input_weights([f"{named}:0.5"]) == ([str(named)], [0.5])  # "ckpt:5" named, weight 0.5
    assert split_input_weights([str(tmp_path / "missing:0.5")]) == ([str(tmp_path / "missing:0.5")], None)
    assert split_input_weights([f"{tmp_path}/x:0.5e"]) == ([f"{tmp_path}/x:0.5e"], None)  # not a number
    url = f"file://{named}"
    assert split_input_weights([f"{url}:1e-1", f"{url}:-2"]) == ([url, url], [0.1, -2.0])
    assert split_input_weights([url]) == ([url], None)


@pytest.mark.parametrize("extra, words", [
    (["--schedule", "ema:alpha=0.5"], "drop --schedule ema:alpha=0.5"),
    (["--schedule", "sma"], "drop --schedule sma"),  # named explicitly: not the default, refused too
    (["--schedule", "custom:weights=0.5/0.5"], "drop --schedule custom:weights=0.5/0.5"),
    (["--weights", "0.5,0.5"], "drop --weights"),
    (["--last", "2"], "drop --last"),
])
def test_weights_beside_a_schedule_weights_or_window_are_refused_in_one_line(three, tmp_path, capsys, extra, words):
    paths, _ = three
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[0]}:0.5", f"{paths[1]}:0.5", "-o", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_mixing_weighted_and_plain_inputs_or_weighting_a_run_is_refused(three, tmp_path, capsys):
    paths, _ = three
    with pytest.raises(ConfigError, match="has a weight .* but .* has none"):
        split_input_weights([f"{paths[0]}:0.5", str(paths[1])])
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[0]}:0.5", str(paths[1]), "-o", str(out), "--quiet"]) == 2
    assert "give every input a weight" in capsys.readouterr().err
    assert cli(["merge", f"{paths[0].parent}:1", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a run directory" in err and err.count("\n") == 1
    assert not out.exists()


def test_custom_schedule_named_beside_weights_is_the_same_merge(three, tmp_path):
    paths, states = three
    out = tmp_path / "out"
    assert cli(["merge", f"{paths[0]}:0.4", f"{paths[1]}:0.6", "--schedule", "custom", "-o", str(out), "--quiet"]) == 0
    assert_equals_reference(out, states[:2], [0.4, 0.6])
