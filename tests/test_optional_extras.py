"""The core install can inspect, merge and eval: the CLI starts without torch, Optuna, SciPy or matplotlib,
inspects a safetensors run without torch, and a missing optional package is one line naming its extra.

Each check runs in a fresh interpreter (this one has imported everything already)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HEAVY = ("torch", "optuna", "scipy", "matplotlib", "transformers")


def _run_cli(argv: list[str], blocked: tuple[str, ...] = ()) -> tuple[int, str, str, list[str]]:
    """``ckptmerge ARGV`` in a new interpreter with ``blocked`` packages made unimportable; returns the exit
    code, stdout, stderr and which of HEAVY it imported."""
    code = f"""
import json, sys
for name in {list(blocked)!r}:
    sys.modules[name] = None  # import fails as if the package were not installed
from ckptmerge.cli.main import main
try:
    rc = main({argv!r})
except SystemExit as exc:  # --help
    rc = exc.code
sys.stdout.flush()
print("\\nLOADED=" + json.dumps([m for m in {list(HEAVY)!r} if sys.modules.get(m) is not None]))
sys.exit(rc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out, _, loaded = proc.stdout.rpartition("\nLOADED=")
    return proc.returncode, out, proc.stderr, json.loads(loaded)


@pytest.fixture(scope="module")
def safetensors_run(tmp_path_factory) -> Path:
    """Two checkpoints written with safetensors' own torch API: float32 weights, a bfloat16 one, an int64 buffer."""
    run = tmp_path_factory.mktemp("extras") / "run"
    for step in (100, 200):
        g = torch.Generator().manual_seed(step)
        folder = run / f"step-{step:06d}"
        folder.mkdir(parents=True)
        save_file({"embed.weight": torch.randn(16, 4, generator=g), "head.weight": torch.randn(4, 16, generator=g),
                   "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
                   "position_ids": torch.arange(8)}, str(folder / "model.safetensors"))
    return run


def test_help_imports_no_torch_and_no_optional_package():
    rc, out, err, loaded = _run_cli(["--help"])
    assert rc == 0 and "inspect" in out and "search" in out, err
    assert loaded == []


@pytest.mark.parametrize("command", ["merge", "eval", "search", "sweep", "train", "watch", "inspect"])
def test_subcommand_help_imports_no_torch(command):
    rc, out, err, loaded = _run_cli([command, "--help"])
    assert rc == 0 and "usage: ckptmerge" in out, err
    assert loaded == []


def test_inspect_of_a_safetensors_run_imports_no_torch(safetensors_run):
    rc, out, err, loaded = _run_cli(["inspect", str(safetensors_run)])
    assert rc == 0, err
    assert loaded == []
    rows = [line for line in out.splitlines() if line.strip().startswith("step-")]
    assert len(rows) == 2 and "2 checkpoints" in out
    for row in rows:  # two float32 tensors first, then one bfloat16 and one int64 (as written above)
        assert "float32/" in row and "bfloat16" in row and "int64" in row and "safetensors" in row


def test_inspect_dtypes_match_the_safetensors_library(safetensors_run):
    from safetensors import safe_open

    from ckptmerge.io.safetensors_header import stored_dtypes

    file = safetensors_run / "step-000100" / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        want = {k: str(f.get_tensor(k).dtype).removeprefix("torch.") for k in f.keys()}
    assert stored_dtypes(file) == want


@pytest.mark.parametrize(("blocked", "extra_argv", "needed_by", "extra"), [
    ("optuna", [], "search needs the optional package optuna", "search"),
    ("scipy", [], "search --sampler gp needs the optional package scipy", "search"),
    ("matplotlib", ["--plots", "PLOTS"], "search --plots needs the optional package matplotlib", "plots"),
])
def test_a_missing_extra_is_one_line_naming_it(safetensors_run, tmp_path, blocked, extra_argv, needed_by, extra):
    argv = ["search", str(safetensors_run), "--data", "shakespeare-val", "--trials", "2",
            *[str(tmp_path / a) if a == "PLOTS" else a for a in extra_argv]]
    rc, out, err, _ = _run_cli(argv, blocked=(blocked,))
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{needed_by}: pip install 'ckptmerge[{extra}]'" in err
    assert not (tmp_path / "PLOTS").exists()


def test_import_optional_names_the_extra_but_leaves_an_installed_package_s_own_import_error(tmp_path, monkeypatch):
    from ckptmerge.errors import MissingExtraError, import_optional

    assert import_optional("json", extra="x", needed_by="y") is json
    with pytest.raises(MissingExtraError, match=r"^demo needs the optional package no_such_pkg_zz: "
                                                r"pip install 'ckptmerge\[plots\]'$"):
        import_optional("no_such_pkg_zz.sub", extra="plots", needed_by="demo")
    (tmp_path / "broken_pkg_zz").mkdir()
    (tmp_path / "broken_pkg_zz" / "__init__.py").write_text("import missing_dependency_zz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="missing_dependency_zz"):  # installed, but broken: not our extra
        import_optional("broken_pkg_zz", extra="plots", needed_by="demo")


def test_trackers_and_data_readers_name_their_extra(monkeypatch, tmp_path):
    from ckptmerge.data.sources import _parquet_pieces
    from ckptmerge.errors import MissingExtraError
    from ckptmerge.online.trackers import make_tracker

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError, match=r"^--log wandb needs the optional package wandb: "
                                                r"pip install 'ckptmerge\[wandb\]'$"):
        make_tracker("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"x\.parquet: reading Parquet needs the optional package pyarrow: "
                                                r"pip install 'ckptmerge\[data\]'$"):
        next(_parquet_pieces(tmp_path / "x.parquet", "text"))
