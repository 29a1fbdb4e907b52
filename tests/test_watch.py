"""``watch`` keeps a merge equal to the offline merge of the same window, across its own restarts."""

import json
import os
import time

import pytest
import torch
from conftest import make_state
from safetensors.torch import save_file

from ckptmerge import compute_coeffs, discover, merge, open_checkpoint, select_last
from ckptmerge.cli.main import main
from ckptmerge.online.watch import WatchConfig, Watcher


def add_checkpoint(run, step, seed, age_s=60.0):
    folder = run / f"step-{step:06d}"
    folder.mkdir(parents=True)
    save_file(make_state(seed, step=step), folder / "model.safetensors")
    old = time.time() - age_s  # settled long ago
    os.utime(folder / "model.safetensors", (old, old))
    return folder


def assert_same_as_offline(tmp_path, run, out, schedule, n=None, folder="", **params):
    refs = discover(run).checkpoints
    refs = select_last(refs, n) if n else refs
    merge(refs, compute_coeffs(schedule, refs, **params), tmp_path / "offline", progress=False, force=True)
    watched_dir = out / "current" if (out / "current").exists() else out / folder
    offline, watched = open_checkpoint(tmp_path / "offline"), open_checkpoint(watched_dir)
    assert set(offline.keys()) == set(watched.keys())
    for name in offline.keys():
        torch.testing.assert_close(watched.get(name), offline.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_sliding_sma_survives_restart_and_equals_offline_window(tmp_path):
    run, out = tmp_path / "run", tmp_path / "watch"
    for i in range(4):
        add_checkpoint(run, 100 * (i + 1), seed=i)
    cfg = WatchConfig(str(run), str(out), methods=["sma:n=3"], settle_s=1.0)
    assert Watcher(cfg).poll() == [100, 200, 300, 400]
    assert_same_as_offline(tmp_path, run, out, "sma", n=3)
    for i in range(4, 9):  # the run goes on; a new watch process picks up where the old one stopped
        add_checkpoint(run, 100 * (i + 1), seed=i)
    assert Watcher(cfg).poll() == [500, 600, 700, 800, 900]
    assert_same_as_offline(tmp_path, run, out, "sma", n=3)
    state = json.loads((out / ".watch-state.json").read_text())
    assert [s["step"] for s in state["seen"]] == [100 * (i + 1) for i in range(9)]
    assert state["methods"]["sma-n3"]["done_through"] == 900


def test_ema_equals_offline_ema_over_every_checkpoint(tmp_path):
    run, out = tmp_path / "run", tmp_path / "watch"
    for i in range(5):
        add_checkpoint(run, 10 * (i + 1), seed=i)
    Watcher(WatchConfig(str(run), str(out), methods=["ema:alpha=0.3"], settle_s=1.0)).poll()
    assert_same_as_offline(tmp_path, run, out, "ema", alpha=0.3)


def test_checkpoint_still_being_written_is_not_read(tmp_path):
    run, out = tmp_path / "run", tmp_path / "watch"
    add_checkpoint(run, 100, seed=0)
    add_checkpoint(run, 200, seed=1, age_s=0.0)  # just written: not settled yet
    partial = run / "step-000300"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x10\x00")  # a truncated file, old enough but unreadable
    old = time.time() - 60
    os.utime(partial / "model.safetensors", (old, old))
    watcher = Watcher(WatchConfig(str(run), str(out), settle_s=30.0))
    assert watcher.poll() == [100]


def test_changed_settings_on_restart_are_refused(tmp_path):
    run, out = tmp_path / "run", tmp_path / "watch"
    add_checkpoint(run, 100, seed=0)
    Watcher(WatchConfig(str(run), str(out), methods=["sma:n=3"], settle_s=1.0)).poll()
    from ckptmerge.errors import CkptMergeError

    with pytest.raises(CkptMergeError, match="sma:n=3"):
        Watcher(WatchConfig(str(run), str(out), methods=["sma:n=4"], settle_s=1.0))


def test_watch_cli_once(tmp_path):
    run = tmp_path / "run"
    for i in range(3):
        add_checkpoint(run, 100 * (i + 1), seed=i)
    assert main(["watch", str(run), "-o", str(tmp_path / "w"), "--last", "2", "--every", "100", "--once",
                 "--settle-s", "1"]) == 0
    assert_same_as_offline(tmp_path, run, tmp_path / "w", "sma", n=2)


def test_watch_method_spec_equals_offline_merge(tmp_path):
    run = tmp_path / "run"
    for i in range(4):
        add_checkpoint(run, 100 * (i + 1), seed=i)
    add_checkpoint(run, 450, seed=9)  # off the every=100 grid: never merged
    assert main(["watch", str(run), "-o", str(tmp_path / "w"), "--method", "sma:n=3,every=100", "--once",
                 "--settle-s", "1"]) == 0
    (run / "step-000450" / "model.safetensors").unlink()
    (run / "step-000450").rmdir()
    assert_same_as_offline(tmp_path, run, tmp_path / "w", "sma", n=3)
    assert main(["watch", str(run), "-o", str(tmp_path / "e"), "--method", "ema:alpha=0.3", "--once",
                 "--settle-s", "1"]) == 0
    assert_same_as_offline(tmp_path, run, tmp_path / "e", "ema", alpha=0.3)


def test_watch_old_flags_still_work_with_one_notice_each(tmp_path, capsys):
    run = tmp_path / "run"
    for i in range(3):
        add_checkpoint(run, 10 * (i + 1), seed=i)
    assert main(["watch", str(run), "-o", str(tmp_path / "w"), "--schedule", "ema", "--alpha", "0.3",
                 "--eval-tokens", "64", "--once", "--settle-s", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert warnings == ["ckptmerge: warning: --schedule is deprecated; use --method sma or --method ema:alpha=A",
                        "ckptmerge: warning: --alpha is deprecated; use --method ema:alpha=A",
                        "ckptmerge: warning: --eval-tokens is deprecated; use --tokens"]
    assert_same_as_offline(tmp_path, run, tmp_path / "w", "ema", alpha=0.3)


@pytest.mark.parametrize("flags, words", [
    (["--method", "wma:alpha=0.2"], "wma takes n, every, not 'alpha'"),
    (["--method", "sma", "--method", "sma"], "the same method twice"),
    (["--method", "ema:alpha=0.2", "--last", "3"], "for a window EMA write ema:alpha=A,n=3"),
    (["--method", "sma:n=3", "--last", "4"], "--last 4 disagrees with n in --method sma:n=3"),
    (["--method", "sma", "--schedule", "ema"], "without the old --schedule / --alpha"),
    (["--schedule", "sma", "--alpha", "0.2"], "sma takes none"),
])
def test_watch_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys, flags, words):
    add_checkpoint(tmp_path / "run", 10, seed=0)
    assert main(["watch", str(tmp_path / "run"), "-o", str(tmp_path / "w"), *flags, "--once"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0], errors
    assert not (tmp_path / "w" / "current").exists() and not list((tmp_path / "w").glob("sma*"))
