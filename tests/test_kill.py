"""kill -9 at chosen moments: a merge and a training run are SIGKILLed mid-way, then run again.

A driver process wraps one function of ckptmerge so that its N-th call writes a ``ready`` file and
sleeps; the test then SIGKILLs it there. Checks: the destination holds nothing new (or the old
output, intact), the debris is found, the next run removes it and succeeds, and a resumed training
run is bit-identical to an uninterrupted one. The killed processes run in parallel to keep it short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_state, tree_digest, write_series

from ckptmerge.cli.main import main

DRIVER = r'''
import importlib, os, sys, time
from pathlib import Path
ready, target, when, count, threads, argv = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
import torch
torch.set_num_threads(threads)
module_name, attr = target.split(":")
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def stall():
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)
def wrapped(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == count:
        stall()
    result = real(*args, **kwargs)
    if when == "after" and calls[0] == count:
        stall()
    return result
setattr(owner, name, wrapped)
from ckptmerge.cli.main import main
sys.exit(main(argv))
'''
TEMP_NAME = re.compile(r"^\..*\.(tmp|old)-\d+-\d+-[0-9a-f]{8}-[0-9a-f]{8}$")


def debris(root: Path) -> list[Path]:
    """Every owner-named temporary under (and beside) ``root``."""
    found = [p for p in root.parent.iterdir() if TEMP_NAME.match(p.name) and p.name.startswith(f".{root.name}.")]
    if root.is_dir():
        found += [p for p in root.rglob("*") if TEMP_NAME.match(p.name)]
    return found


def kill_at(tmp_path: Path, points: list[tuple[str, str, int, list[str]]]) -> None:
    """Start one driver per (target, before|after, call number, argv); SIGKILL each once it stalls."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    procs = []
    for i, (target, when, count, argv) in enumerate(points):
        ready = tmp_path / f"ready-{i}"
        cmd = [sys.executable, str(driver), str(ready), target, when, str(count), str(torch.get_num_threads()), *argv]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), ready))
    deadline = time.monotonic() + 900
    for proc, ready in procs:  # every driver stalls at its point before any is killed: a publish of one
        while not ready.exists():  # driver then never sees another's temporary as a dead owner's debris
            assert proc.poll() is None, f"driver exited before the kill point: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "driver never reached the kill point"
            time.sleep(0.05)
    for proc, _ in procs:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL


MERGE_POINTS = {
    "mid-engine": ("ckptmerge.io.safetensors_writer:StreamingSafetensorsWriter.write_rows", "before", 3),
    "before-manifest": ("ckptmerge.merging.output:write_manifest", "before", 1),
    "before-rename": ("ckptmerge.io.publish:_publish", "before", 1),
}


def test_killed_merges_leave_nothing_and_the_next_run_cleans_up(tmp_path):
    run_dir = tmp_path / "run"
    write_series(run_dir, [make_state(i) for i in range(3)])
    inputs = tree_digest(run_dir)
    old = tmp_path / "forced"
    old.mkdir()
    (old / "keep.txt").write_text("old output")
    outs = {name: tmp_path / name for name in MERGE_POINTS}
    points = [(*MERGE_POINTS[name], ["merge", str(run_dir), "-o", str(out), "--quiet"]) for name, out in outs.items()]
    points.append((*MERGE_POINTS["before-rename"], ["merge", str(run_dir), "-o", str(old), "--force", "--quiet"]))
    kill_at(tmp_path, points)

    for out in outs.values():
        assert not out.exists() and debris(out), out
    assert tree_digest(old) == {"keep.txt": b"old output"} and debris(old)  # the old output is intact
    assert tree_digest(run_dir) == inputs
    assert main(["clean", str(outs["before-manifest"])]) == 0  # `ckptmerge clean` removes one output's debris
    assert debris(outs["before-manifest"]) == [] and debris(outs["mid-engine"])
    for out in [*outs.values(), old]:
        assert main(["merge", str(run_dir), "-o", str(out), "--quiet", "--force"]) == 0
        assert (out / "merge.json").is_file() and debris(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert tree_digest(run_dir) == inputs


TRAIN_FLAGS = ["--preset", "tiny", "--max-steps", "8", "--lr", "3e-3", "--warmup-steps", "2", "--batch-size", "4",
               "--context", "32", "--save-every", "4", "--log-every", "1", "--seed", "3", "--quiet"]
TRAIN_POINTS = {
    "between checkpoints": ("ckptmerge.train.loop:train_step", "before", 6),
    "inside a checkpoint save": ("ckptmerge.train.checkpointing:torch.save", "before", 2),
    "right after a checkpoint": ("ckptmerge.train.trainer:save_checkpoint", "after", 1),
}


@pytest.fixture(scope="module")
def corpus_and_reference(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("train")
    os.environ["CKPTMERGE_CACHE"] = str(root / "cache")
    rng = np.random.default_rng(0)
    words = ["the", "king", "doth", "speak", "and", "queen", "answers", "thee", "not", "so"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, size=6000)) + "\n")
    flags = [*TRAIN_FLAGS, "--data", str(root / "corpus.txt")]
    assert main(["train", "-o", str(root / "reference"), *flags]) == 0
    return flags, root / "reference"


def test_killed_training_resumes_bit_identical_without_debris(tmp_path, corpus_and_reference):
    flags, reference = corpus_and_reference
    runs = {name: tmp_path / name.replace(" ", "-") for name in TRAIN_POINTS}
    kill_at(tmp_path, [(*TRAIN_POINTS[name], ["train", "-o", str(run), *flags]) for name, run in runs.items()])
    assert debris(runs["inside a checkpoint save"])  # the half-written step-000008
    assert (runs["right after a checkpoint"] / "step-000004").is_dir()
    for run in runs.values():
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
        assert debris(run) == []
        for step in (4, 8):
            name = f"step-{step:06d}/model.safetensors"
            assert (run / name).read_bytes() == (reference / name).read_bytes(), (run, name)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert losses == [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


SLOW_WRITES = r'''
import os, signal, sys, time
from pathlib import Path
# Ctrl-C as a terminal delivers it: a job started in the background (nohup, `cmd &` in a script) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler; the merge would rightly run on
signal.signal(signal.SIGINT, signal.default_int_handler)
ready, argv = sys.argv[1], sys.argv[2:]
import ckptmerge.io.safetensors_writer as writer_mod
real = writer_mod.StreamingSafetensorsWriter.write_rows
def slow(self, *args):  # every chunk takes a while, on the merge workers' threads; one line per chunk
    with open(ready, "a") as log:
        log.write("chunk\n")
    time.sleep(0.3)
    return real(self, *args)
writer_mod.StreamingSafetensorsWriter.write_rows = slow
from ckptmerge.cli.main import main
sys.exit(main(argv))
'''


def test_ctrl_c_stops_the_merge_workers_and_publishes_nothing(tmp_path):
    """SIGINT reaches the main thread while the workers merge: they stop after their chunk, the temporary
    folder goes, the exit status is 130 with one line, and the inputs are untouched."""
    run_dir = tmp_path / "run"
    write_series(run_dir, [make_state(i) for i in range(3)])
    inputs = tree_digest(run_dir)
    (tmp_path / "driver.py").write_text(SLOW_WRITES)
    ready, out = tmp_path / "ready", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(ready), "merge", str(run_dir), "-o",
                             str(out), "--quiet", "--chunk-size", "32B"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was published" in err and len(err.splitlines()) == 1
    chunks = len(ready.read_text().splitlines())
    assert chunks < 20  # stopped early: 32-byte chunks, the 40 x 8 fp32 embedding alone is 40 of them
    assert not out.exists() and debris(out) == [] and tree_digest(run_dir) == inputs
