"""Shared checks for the trainer-layout tests: run the CLI on a run directory, compare with an fp64 mean."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ckptmerge.cli.main import main


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def fp64_mean(states: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The independent reference: float64 NumPy mean of each float tensor over the given states."""
    return {k: np.mean([s[k].detach().to(torch.float64).numpy() for s in states], axis=0)
            for k, v in states[-1].items() if v.is_floating_point()}


def assert_merge_matches(run_dir: Path, out: Path, reference: dict[str, np.ndarray], steps: list[int],
                         framework: str, key_map=lambda k: k) -> None:
    """inspect shows the framework and the true steps; merge --last 3 --schedule sma equals the reference."""
    code, table = run_cli("inspect", run_dir)
    assert code == 0
    listed = [int(line.split()[1]) for line in table.splitlines()[2:] if framework in line.split()]
    assert listed == steps, table
    code, _ = run_cli("merge", run_dir, "-o", out, "--last", "3", "--schedule", "sma", "--quiet")
    assert code == 0
    merged = merged_tensors(out)
    assert sorted(key_map(k) for k in reference) == sorted(merged)
    for name, want in reference.items():
        got = merged[key_map(name)].to(torch.float64).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)
