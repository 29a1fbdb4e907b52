"""Publishing: races between writers, owner-marked temporaries, umask modes, and inputs that change mid-merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_state, tree_digest, write_series
from safetensors.torch import load_file

from ckptmerge import compute_coeffs, discover, merge
from ckptmerge.cli.main import main
from ckptmerge.errors import CheckpointFormatError, OutputExistsError
from ckptmerge.io.process_liveness import process_state, start_ticks
from ckptmerge.io.publish import atomic_folder, remove_stale, temp_name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_name(dest_name: str, pid: int) -> str:
    """A temporary name as ``temp_name`` makes it, but owned by ``pid`` (with this host's hash)."""
    own = temp_name(dest_name)
    head, tail = own.rsplit(".tmp-", 1)
    _pid, start, host, rand = tail.split("-")
    return f"{head}.tmp-{pid}-{start}-{host}-{rand}"


def merge_all(run_dir, out, **kw):
    refs = discover(run_dir).checkpoints
    return merge(refs, compute_coeffs("sma", refs), out, progress=False, **kw)


def test_output_that_appears_during_the_merge_is_not_replaced(tmp_path, series):
    """Writer A starts, writer B publishes first: A must refuse (without force) and leave B's output."""
    run_dir, _, _ = series
    dest = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_folder(dest) as tmp:
            (tmp / "a.txt").write_text("A")
            merge_all(run_dir, dest)  # B, complete and published while A is still writing
    assert (dest / "merge.json").is_file() and not (dest / "a.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_force_replaces_an_output_that_appeared_during_the_merge(tmp_path, series):
    run_dir, _, _ = series
    dest = tmp_path / "out"
    with atomic_folder(dest, force=True) as tmp:
        (tmp / "a.txt").write_text("A")
        merge_all(run_dir, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_concurrent_merges_to_one_output_exactly_one_wins(tmp_path, series):
    run_dir, states, _ = series
    cmd = [sys.executable, "-m", "ckptmerge", "merge", str(run_dir), "-o", str(tmp_path / "out"), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2, 2], results
    assert all("already exists" in err or "appeared while" in err for code, err in results if code)
    merged = load_file(tmp_path / "out" / "model.safetensors")["embed.weight"]
    expected = sum(s["embed.weight"].double() for s in states) / len(states)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_outputs_get_the_umask_mode(tmp_path, series):
    run_dir, _, _ = series
    old = os.umask(0o027)
    try:
        merge_all(run_dir, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_stale_temporaries_of_dead_owners_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / stale_name("out", dead_pid())
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / temp_name("out")  # this very process: alive
    live.mkdir()
    other_dest = tmp_path / stale_name("other", dead_pid())
    other_dest.mkdir()
    assert remove_stale(tmp_path, "out") == [dead]
    assert live.exists() and other_dest.exists()
    reused = tmp_path / stale_name("other", os.getpid()).replace(
        f"-{start_ticks(os.getpid())}-", "-12345-")  # our pid, another start time: a reused pid
    reused.mkdir()
    assert sorted(remove_stale(tmp_path)) == sorted([other_dest, reused])
    assert live.exists()


def test_a_killed_but_unreaped_owner_counts_as_gone(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        while start_ticks(proc.pid) == "0" and proc.poll() is None:
            pass
        name = stale_name("out", proc.pid).replace(f"-{start_ticks(os.getpid())}-",
                                                   f"-{start_ticks(proc.pid)}-")
        (tmp_path / name).mkdir()
        assert remove_stale(tmp_path) == []  # alive
        os.kill(proc.pid, signal.SIGKILL)
        while process_state(proc.pid)[0] not in ("Z", "X", "?"):
            pass
        assert remove_stale(tmp_path) == [tmp_path / name]  # a zombie: killed, not reaped yet
    finally:
        proc.kill()
        proc.wait()


def test_next_merge_and_clean_command_remove_a_killed_runs_debris(tmp_path, series, capsys):
    run_dir, _, _ = series
    debris = tmp_path / stale_name("out", dead_pid())
    debris.mkdir()
    merge_all(run_dir, tmp_path / "out")
    assert not debris.exists()
    nested = tmp_path / "runs" / "a" / stale_name("step-000100", dead_pid())
    nested.mkdir(parents=True)
    assert main(["clean", str(tmp_path / "runs")]) == 0
    assert not nested.exists() and "1 stale temporary removed" in capsys.readouterr().out


def test_input_folder_that_vanishes_mid_merge_is_an_error(tmp_path, series, monkeypatch):
    run_dir, _, paths = series
    import ckptmerge.merging.offline as offline

    real = offline.run_engine

    def vanish_then_run(*args, **kw):
        stats = real(*args, **kw)
        os.rename(paths[1], tmp_path / "moved")
        return stats

    monkeypatch.setattr(offline, "run_engine", vanish_then_run)
    with pytest.raises(CheckpointFormatError, match="does not exist|changed while"):
        merge_all(run_dir, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_input_replaced_mid_merge_is_an_error_not_a_false_hash(tmp_path, series, monkeypatch):
    run_dir, _, paths = series
    import ckptmerge.merging.offline as offline

    real = offline.run_engine

    def replace_then_run(*args, **kw):
        stats = real(*args, **kw)
        write_series(tmp_path / "other", [make_state(9)])
        os.replace(tmp_path / "other" / "step-000100" / "model.safetensors", paths[2] / "model.safetensors")
        return stats

    monkeypatch.setattr(offline, "run_engine", replace_then_run)
    with pytest.raises(CheckpointFormatError, match="changed while it was being merged"):
        merge_all(run_dir, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_manifest_hash_is_of_the_bytes_merged(tmp_path, series):
    """The recorded full hash equals an independent sha256 over the same files, in the documented format."""
    import hashlib

    run_dir, _, paths = series
    result = merge_all(run_dir, tmp_path / "out", hash="full")
    for entry, path in zip(result.manifest["inputs"], paths):
        digest = hashlib.sha256()
        data = (path / "model.safetensors").read_bytes()
        digest.update(f"model.safetensors:{len(data)}\n".encode() + data)
        assert entry["content_hash"] == f"full-sha256:{digest.hexdigest()}"
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["inputs"] == result.manifest["inputs"]
    assert tree_digest(run_dir)  # inputs still there
