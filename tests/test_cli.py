"""The command line: merge by flags and by YAML recipe, dry-run, inspect, error exit codes."""

import json
import subprocess
import sys

import numpy as np
from conftest import make_state, reference_merge, to_f64, write_series
from safetensors.torch import load_file

from ckptmerge.cli.main import main


def test_merge_method_language_matches_reference_and_the_flags(tmp_path, series, capsys):
    """``--schedule ema:alpha=0.3,n=3,every=100`` is the same merge as the separate flags; clashes are refused."""
    run_dir, states, _ = series
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "spec"), "--schedule", "ema:alpha=0.3,n=3,every=100",
                 "--quiet"]) == 0
    a = 0.3
    want = reference_merge(states[1:], [(1 - a) ** 2, a * (1 - a), a])
    got = load_file(tmp_path / "spec" / "model.safetensors")
    for name, value in want.items():
        np.testing.assert_allclose(to_f64(got[name]), value, rtol=1e-6, atol=1e-7)
    recipe = json.loads((tmp_path / "spec" / "merge.json").read_text())["recipe"]
    assert (recipe["schedule"], recipe["alpha"], recipe["last"], recipe["every"]) == ("ema", 0.3, 3, 100)
    capsys.readouterr()
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "x"), "--schedule", "sma:n=3", "--last", "2"]) == 2
    assert "disagree on n=3 vs --last 2" in capsys.readouterr().err
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "x"), "--schedule", "ema:beta=0.3"]) == 2
    err = capsys.readouterr().err
    assert "not 'beta'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_merge_by_flags_matches_reference_and_records_recipe(tmp_path, series, capsys):
    run_dir, states, _ = series
    code = main(["merge", str(run_dir), "-o", str(tmp_path / "out"), "--schedule", "ema", "--alpha", "0.3",
                 "--last", "3", "--every", "100", "--quiet"])
    assert code == 0
    a = 0.3
    coeffs = [(1 - a) ** 2, a * (1 - a), a]
    want = reference_merge(states[1:], coeffs)
    got = load_file(tmp_path / "out" / "model.safetensors")
    np.testing.assert_allclose(to_f64(got["embed.weight"]), want["embed.weight"], rtol=1e-6, atol=1e-7)
    manifest = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert manifest["recipe"]["schedule"] == "ema" and manifest["recipe"]["alpha"] == 0.3
    assert [i["step"] for i in manifest["inputs"]] == [200, 300, 400]
    assert np.allclose([i["coefficient"] for i in manifest["inputs"]], coeffs)
    assert all(i["content_hash"].startswith("sampled-sha256:") for i in manifest["inputs"])
    assert manifest["stats"]["bytes_written"] > 0 and manifest["stats"]["bytes_read"] > 0


def test_yaml_recipe_with_flag_override(tmp_path, series):
    run_dir, states, _ = series
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs: [{run_dir}]\noutput: {tmp_path / 'out'}\nschedule: wma\nlast: 2\n")
    assert main(["merge", "--config", str(recipe), "--last", "4", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert len(manifest["inputs"]) == 4 and manifest["recipe"]["schedule"] == "wma"


def test_yaml_recipe_reports_every_problem(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("inputs: [x]\nlast: two\nmystery: 1\ndtype: fp8\nchunk_size: lots\n")
    assert main(["merge", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    for needle in ("unknown key 'mystery'", "last: expected int", "dtype: 'fp8'", "chunk_size"):
        assert needle in err


def test_dry_run_reads_no_tensors(tmp_path, capsys):
    run = tmp_path / "run"
    paths = write_series(run, [make_state(i) for i in range(3)])
    for p in paths:  # destroy the weights: a dry run must not notice
        (p / "model.safetensors").write_bytes(b"garbage")
    assert main(["merge", str(run), "-o", str(tmp_path / "out"), "--schedule", "wma", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0.166667" in out and "0.500000" in out and "step-000300" in out
    assert not (tmp_path / "out").exists()


def test_explicit_checkpoint_paths_and_custom_weights(tmp_path, series):
    _, states, paths = series
    assert main(["merge", str(paths[3]), str(paths[0]), "-o", str(tmp_path / "out"), "--schedule", "custom",
                 "--weights", "0.25,0.75", "--quiet"]) == 0  # sorted by step: weights apply oldest first
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = 0.25 * to_f64(states[0]["embed.weight"]) + 0.75 * to_f64(states[3]["embed.weight"])
    np.testing.assert_allclose(to_f64(got["embed.weight"]), want, rtol=1e-6)


def test_errors_exit_2_with_message(tmp_path, series, capsys):
    run_dir, _, _ = series
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "o"), "--schedule", "custom", "--weights", "1,1,1,1"]) == 2
    assert "--normalize" in capsys.readouterr().err
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "o"), "--last", "3", "--every", "150"]) == 2
    assert "multiples of 100" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inspect_lists_checkpoints(series, capsys):
    run_dir, _, _ = series
    assert main(["inspect", str(run_dir), "--tokens-per-step", "1024"]) == 0
    out = capsys.readouterr().out
    assert "step-000400" in out and "409600" in out and "4 checkpoints" in out and "float32" in out


def test_module_entry_point_runs(tmp_path, series):
    run_dir, _, _ = series
    proc = subprocess.run([sys.executable, "-m", "ckptmerge", "merge", str(run_dir), "-o", str(tmp_path / "m"),
                           "--last", "2", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "m" / "model.safetensors").exists()
