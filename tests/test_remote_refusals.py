"""Commands that do not take URLs yet refuse one in a single line that names the command and what works today,
before any work: a URL is never read as a local relative path (``s3:/bucket/run``), never created as one, and
never a traceback or exit 0 (issue 25). No S3 server is needed: the endpoint is unreachable, so a command that
tried to reach it would fail with another line."""

from __future__ import annotations

import json

import pytest

from ckptmerge.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SECRET = "refusal-test-SECRET"
URL = "s3://bucket/run"

# (argv, the flag or argument named in the line); RUN and OUT are local paths under the test's folder
CASES = [
    # watch takes a run and an -o at URLs (tests/test_watch_remote.py, tests/test_watch_remote_out.py)
    (["search", URL, "--trials", "1"], "checkpoint"),
    (["search", "RUN", "-o", "s3://bucket/best"], "-o"),
    (["sweep", URL], "run dir"),
    (["sweep", "RUN", "-o", "s3://bucket/sweep"], "-o"),
    (["sweep", "RUN", "--anneal", "s3://bucket/anneal"], "--anneal"),
    (["recover", URL], "run dir"),
    (["recover", "RUN", "-o", "s3://bucket/recovered"], "-o"),
    (["train", "--resume", URL], "run dir"),
    (["train", "-o", URL, "--max-steps", "2"], "run dir"),
    (["train", "-o", "OUT", "--fork-from", f"{URL}/checkpoint-4"], "fork from"),
    (["train", "-o", "OUT", "--init-from", "s3://bucket/merged"], "init from"),
    (["train", "-o", "OUT", "--train-data", "s3://bucket/train.txt"], "train data"),
    (["demo", "--quick", "-o", "s3://bucket/demo"], "output"),
    (["demo", "--quick", "-o", "OUT", "--train-data", "s3://bucket/train.txt"], "train data"),
    (["data", "tokenize", "s3://bucket/text.jsonl", "--tokenizer", "TOK", "-o", "OUT.bin"], "source"),
    (["data", "tokenize", "text.jsonl", "--tokenizer", "s3://bucket/tok", "-o", "OUT.bin"], "tokenizer"),
    (["data", "tokenize", "text.jsonl", "--tokenizer", "TOK", "-o", "s3://bucket/tokens.bin"], "output"),
    (["eval", "RUN", "--json", "s3://bucket/results.json"], "--json"),
    (["eval", "s3://bucket/run/checkpoint-4", "--lm-eval", "hellaswag"], "--lm-eval model"),
    (["eval", "RUN", "--model-config", "s3://bucket/config"], "--model-config"),
    (["merge", "--config", "s3://bucket/recipe.yaml"], "--config"),
]


@pytest.fixture
def unreachable(tmp_path, monkeypatch):
    """An endpoint nothing answers on, a secret in the options, and the test's folder as the working directory."""
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps({
        "endpoint_url": "http://127.0.0.1:9", "key": "k-refusal", "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}))
    monkeypatch.setenv("CKPTMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, named", CASES, ids=[" ".join(a[:2]) + f" ({n})" for a, n in CASES])
def test_a_url_is_refused_in_one_line_naming_the_command(unreachable, capsys, argv, named):
    before = sorted(p.relative_to(unreachable) for p in unreachable.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and " warning: " not in line]
    assert len(err) == 1, err
    command = argv[0] if argv[0] != "data" else "data tokenize"
    line = err[0]
    assert line.startswith(f"ckptmerge {argv[0]}: error: {command} {named} s3://bucket/"), line
    assert "does not take URLs for this yet" in line and "docs/storage.md" in line, line
    assert SECRET not in line and "Traceback" not in captured.err
    assert captured.out == ""  # nothing printed before the refusal
    assert sorted(p.relative_to(unreachable) for p in unreachable.rglob("*")) == before  # no "s3:" folder, no OUT


def test_python_entry_points_refuse_a_url(unreachable):
    from ckptmerge.io.remote import RemoteStorageError
    from ckptmerge.merging.discover import discover

    with pytest.raises(RemoteStorageError, match=r"^discover run dir s3://bucket/run: .*discover_remote\(url\)"):
        discover(URL)  # cm.discover
    assert not (unreachable / "s3:").exists()


def test_torchrun_merge_of_a_url_is_refused_once(unreachable):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ckptmerge", "merge", URL, "--last", "2", "-o", "OUT"],
                          check=False, cwd=unreachable, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ckptmerge merge: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "the distributed merge (torchrun) checkpoint s3://bucket/run" in lines[0], lines[0]
    assert "as one process" in lines[0] and SECRET not in proc.stderr
    assert not (unreachable / "OUT").exists() and not (unreachable / "s3:").exists()
