"""Hostile inputs through the command line: each one fails closed.

For every case: a non-zero exit, exactly one line on stderr (``ckptmerge CMD: error: ...``, no
traceback) that names the offending file, nothing at the output (not even a hidden temporary),
the inputs byte-identical, and no payload run (a marker file that must not appear). Fixture files
are written by the tests with the reference libraries (safetensors, torch, json, pickle).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import warnings

import pytest
import torch
from conftest import tree_digest, write_checkpoint
from safetensors.torch import save_file

from ckptmerge.cli.main import main

GOOD = {"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float32)}


class Payload:
    """Unpickling this would create ``marker``: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def raw_safetensors(path, header, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def assert_failed_closed(code, err, tmp_path, before, run_dir, *, command="merge", names=()):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckptmerge {command}: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
    assert tree_digest(run_dir) == before
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def run(tmp_path):
    """A run of two HF safetensors checkpoints; the tests make the newest one (step-000200) hostile."""
    run_dir = tmp_path / "run"
    for step, scale in ((100, 1.0), (200, 2.0)):
        folder = run_dir / f"step-{step:06d}"
        folder.mkdir(parents=True)
        save_file({k: v * scale for k, v in GOOD.items()}, folder / "model.safetensors")
    return run_dir


def _w_and_b(w_entry, extra=None):
    header = {"w": w_entry, "b": entry(shape=(2,), offsets=(16, 24))}
    return {**header, **(extra or {})}


DATA = bytes(24)
SAFETENSORS_CASES = {
    "overlapping ranges": (_w_and_b(entry(offsets=(8, 24))), DATA, "overlap"),
    "negative offset into the header": (_w_and_b(entry(offsets=(-8, 8))), DATA, "data_offsets"),
    "dtype is a list": (_w_and_b(entry(dtype=["F32"])), DATA, "dtype"),
    "entry is a number": (_w_and_b(7), DATA, "not an object"),
    "missing offsets": (_w_and_b({"dtype": "F32", "shape": [4]}), DATA, "data_offsets"),
    "shape is a string": (_w_and_b(entry(shape="4")), DATA, "shape"),
    "negative shape": (_w_and_b(entry(shape=(-4,))), DATA, "shape"),
    "boolean shape": (_w_and_b(entry(shape=(True, 4))), DATA, "shape"),
    "metadata is a list": (_w_and_b(entry(), {"__metadata__": ["format", "pt"]}), DATA, "__metadata__"),
    "metadata values not strings": (_w_and_b(entry(), {"__metadata__": {"format": 1}}), DATA, "__metadata__"),
    "header is a list": ([1, 2], DATA, "not an object"),
    "range past the data": (_w_and_b(entry(offsets=(16, 32)), ), DATA, "past the end"),
    "range does not match shape": (_w_and_b(entry(offsets=(0, 12))), DATA, "needs 16"),
    "end before begin": (_w_and_b(entry(offsets=(16, 0))), DATA, "data_offsets"),
    "duplicate keys": (b'{"w":' + json.dumps(entry()).encode() + b',"w":' + json.dumps(entry()).encode()
                       + b',"b":' + json.dumps(entry(shape=(2,), offsets=(16, 24))).encode() + b"}", DATA, "duplicate"),
    "header not UTF-8": (b'{"w\xff": 1}', DATA, "not valid JSON"),
    "deeply nested header": (b"[" * 100000 + b"]" * 100000, DATA, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_malformed_safetensors_header(tmp_path, run, capsys, case):
    header, data, expected = SAFETENSORS_CASES[case]
    raw_safetensors(run / "step-000200" / "model.safetensors", header, data)
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run, names=("step-000200", expected))


def test_header_length_beyond_the_file(tmp_path, run, capsys):
    (run / "step-000200" / "model.safetensors").write_bytes(struct.pack("<Q", 4096) + b"{}")
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out")
    assert_failed_closed(code, err, tmp_path, before, run, names=("cut short",))


def _sharded(folder, weight_map, files=None):
    folder.joinpath("model.safetensors").unlink()
    for name, tensors in (files or {}).items():
        save_file(tensors, folder / name)
    text = weight_map if isinstance(weight_map, bytes) else json.dumps({"weight_map": weight_map}).encode()
    (folder / "model.safetensors.index.json").write_bytes(text)


def _outside_file(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    save_file({"b": torch.full((2,), 99.0)}, other / "secret.safetensors")
    return other / "secret.safetensors"


INDEX_CASES = {
    "absolute path": lambda f, t: _sharded(f, {"w": "a.safetensors", "b": str(_outside_file(t))},
                                           {"a.safetensors": {"w": GOOD["w"]}}),
    "dot-dot path": lambda f, t: _sharded(f, {"w": "a.safetensors", "b": "../../elsewhere/secret.safetensors"},
                                          {"a.safetensors": {"w": GOOD["w"]}}) or _outside_file(t),
    "symlink out of the folder": lambda f, t: (_sharded(f, {"w": "a.safetensors", "b": "b.safetensors"},
                                                        {"a.safetensors": {"w": GOOD["w"]}}),
                                               os.symlink(_outside_file(t), f / "b.safetensors")),
    "weight_map is a list": lambda f, t: _sharded(f, ["a.safetensors"], {"a.safetensors": GOOD}),
    "file name is a number": lambda f, t: _sharded(f, {"w": 1, "b": 1}, {"a.safetensors": GOOD}),
    "index not JSON": lambda f, t: _sharded(f, b"{weight_map: nope", {"a.safetensors": GOOD}),
    "index not UTF-8": lambda f, t: _sharded(f, b'{"weight_map": {"\xff": "a"}}', {"a.safetensors": GOOD}),
    "duplicate keys": lambda f, t: _sharded(f, b'{"weight_map": {"w": "a.safetensors"}, "weight_map": {}}',
                                            {"a.safetensors": GOOD}),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_hostile_shard_index(tmp_path, run, capsys, case):
    INDEX_CASES[case](run / "step-000200", tmp_path)
    before = tree_digest(run)
    outside = tree_digest(tmp_path / "elsewhere") if (tmp_path / "elsewhere").exists() else None
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run, names=("model.safetensors.index.json",))
    if outside is not None:
        assert tree_digest(tmp_path / "elsewhere") == outside


def _dcp_run(tmp_path):
    run_dir = tmp_path / "run"
    for step, scale in ((100, 1.0), (200, 2.0)):
        write_checkpoint(run_dir / f"step-{step:06d}", {k: v * scale for k, v in GOOD.items()}, "dcp")
    return run_dir


def _rewrite_metadata(folder, edit):
    path = folder / ".metadata"
    meta = pickle.loads(path.read_bytes())  # trusted here: the test wrote it with torch
    edit(meta)
    path.write_bytes(pickle.dumps(meta))


def _retarget_storage(meta, relative_path, offset=None, length=None):
    for index, info in meta.storage_data.items():
        if index.fqn == "model.w":
            info.relative_path = relative_path
            info.offset = info.offset if offset is None else offset
            info.length = info.length if length is None else length


def _payload_chunk(folder, marker):
    (folder / "evil.distcp").write_bytes(pickle.dumps(Payload(marker)))
    size = (folder / "evil.distcp").stat().st_size
    _rewrite_metadata(folder, lambda m: _retarget_storage(m, "evil.distcp", 0, size))


def _grow_chunk(meta):
    for md in meta.state_dict_metadata.values():
        if hasattr(md, "size") and tuple(md.size) == (4,):
            md.size = torch.Size([3])


DCP_CASES = {
    "metadata runs a payload": (lambda f, m: (f / ".metadata").write_bytes(pickle.dumps(Payload(m))), ".metadata"),
    "metadata is a list": (lambda f, m: (f / ".metadata").write_bytes(pickle.dumps([1, 2])), "not DCP Metadata"),
    "metadata is garbage": (lambda f, m: (f / ".metadata").write_bytes(b"\x80\x04\x95garbage"), ".metadata"),
    "metadata truncated": (lambda f, m: (f / ".metadata").write_bytes((f / ".metadata").read_bytes()[:40]), ".metadata"),
    "storage path climbs out": (lambda f, m: _rewrite_metadata(
        f, lambda meta: _retarget_storage(meta, "../step-000100/__0_0.distcp")), "outside the checkpoint folder"),
    "storage path is absolute": (lambda f, m: _rewrite_metadata(
        f, lambda meta: _retarget_storage(meta, str(f.parent / "step-000100" / "__0_0.distcp"))), "outside"),
    "storage offset negative": (lambda f, m: _rewrite_metadata(
        f, lambda meta: _retarget_storage(meta, "__0_0.distcp", offset=-5)), "byte range"),
    "chunk runs a payload": (_payload_chunk, "evil.distcp"),
    "chunk larger than the tensor": (lambda f, m: [_rewrite_metadata(x, _grow_chunk) for x in (f.parent / "step-000100", f)],
                                     "outside the tensor"),
}


@pytest.mark.parametrize("case", list(DCP_CASES))
def test_hostile_dcp_folder(tmp_path, capsys, case):
    build, expected = DCP_CASES[case]
    run_dir = _dcp_run(tmp_path)
    build(run_dir / "step-000200", tmp_path / "pwned")
    before = tree_digest(run_dir)
    code, err = run_cli(capsys, "merge", run_dir, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run_dir, names=("step-000", expected))


TORCH_CASES = {
    "integer keys": (lambda p, m: torch.save({0: torch.zeros(4), 1: torch.zeros(2)}, p), "must be strings"),
    "payload pickle": (lambda p, m: p.write_bytes(pickle.dumps({"w": Payload(m)})), "Nothing from it was executed"),
    "garbage": (lambda p, m: p.write_bytes(b"PK\x03\x04 not really a zip"), "cannot read torch checkpoint"),
    "not a dict": (lambda p, m: torch.save([torch.zeros(4)], p), "found no model tensors"),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_hostile_torch_file(tmp_path, capsys, case):
    build, expected = TORCH_CASES[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(GOOD, run_dir / "ckpt_100.pt")
    build(run_dir / "ckpt_200.pt", tmp_path / "pwned")
    before = tree_digest(run_dir)
    code, err = run_cli(capsys, "merge", run_dir, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run_dir, names=("ckpt_200.pt", expected))


METADATA_CASES = {
    "string global_step": ("trainer_state.json", {"global_step": "200"}, "global_step"),
    "log_history not a list": ("trainer_state.json", {"global_step": 200, "log_history": {"lr": 1}}, "log_history"),
    "log_history of numbers": ("trainer_state.json", {"global_step": 200, "log_history": [1, 2]}, "log_history"),
    "string learning rate": ("trainer_state.json", {"global_step": 200, "log_history": [{"learning_rate": "x"}]},
                             "learning_rate"),
    "own metadata step is a list": ("ckptmerge.json", {"step": [200]}, "step"),
    "own metadata lr is text": ("ckptmerge.json", {"step": 200, "lr": "fast"}, "lr"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_malformed_checkpoint_metadata(tmp_path, run, capsys, case):
    name, content, expected = METADATA_CASES[case]
    (run / "step-000200" / name).write_text(json.dumps(content))
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run, names=(name, expected))


LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(10))
YAML_CASES = {
    "not UTF-8": (b"schedule: sma\nlast: 2\n# caf\xe9\n", "UTF-8"),
    "billion laughs": (LAUGHS.encode() + b"schedule: *l9\n", "aliases"),
    "recursive alias": (b"a: &a [*a]\nschedule: sma\n", "alias"),
    "not a mapping": (b"- sma\n- ema\n", "mapping"),
    "invalid YAML": (b"schedule: [sma\n", "invalid YAML"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_hostile_yaml_recipe(tmp_path, run, capsys, case):
    text, expected = YAML_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--config", recipe)
    assert_failed_closed(code, err, tmp_path, before, run, names=("recipe.yaml", expected))
    assert len(err) < 3000


def test_large_but_bounded_yaml_value_is_reported_briefly(tmp_path, run, capsys):
    """Aliases under the bound construct fine; the type error shows a bounded repr of the value."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 9) + "]\n" for i in range(4))
                      + "last: *l3\n")
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--config", recipe)
    assert code != 0 and len(err.splitlines()) == 1 and len(err) < 3000 and "last" in err


def test_resume_of_a_folder_without_run_json(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    code, err = run_cli(capsys, "train", "--resume", tmp_path / "notarun", "--quiet")
    assert code != 0 and len(err.splitlines()) == 1 and "run.json" in err and "Traceback" not in err
    assert list((tmp_path / "notarun").iterdir()) == []


def test_output_parent_is_a_file(tmp_path, run, capsys):
    (tmp_path / "afile").write_text("x")
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "afile" / "out", "--quiet")
    assert code != 0 and len(err.splitlines()) == 1 and str(tmp_path / "afile") in err and "Traceback" not in err
    assert tree_digest(run) == before and (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path, run, capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "ro" / "out", "--quiet")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert code != 0 and len(err.splitlines()) == 1 and str(tmp_path / "ro") in err
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("where", ["reserving the output", "writing without fallocate"])
def test_full_disk(tmp_path, run, capsys, monkeypatch, where):
    import ctypes

    import ckptmerge.io.output_file as output_mod
    from ckptmerge.io import libc

    def no_room(*_):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    if where == "reserving the output":
        monkeypatch.setattr(libc, "fallocate", no_room)
    else:  # a filesystem without fallocate: plain writes, the disk fills after the header
        monkeypatch.setattr(libc, "fallocate", None)
        real_write, written = output_mod._write_all, []

        def fill_up(fd, src, offset, path):
            written.append(src.numel())
            if len(written) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_write(fd, src, offset, path)

        monkeypatch.setattr(output_mod, "_write_all", fill_up)
    before = tree_digest(run)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run, names=("No space left", "model.safetensors"))


def test_debug_flag_shows_the_traceback(tmp_path, run, capsys):
    raw_safetensors(run / "step-000200" / "model.safetensors", [1], DATA)
    code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--debug")
    assert code != 0 and "Traceback" in err and err.strip().splitlines()[-1].startswith("ckptmerge merge: error:")


def test_float16_overflow_is_refused_unless_allowed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (100, 200):
        (run_dir / f"step-{step:06d}").mkdir(parents=True)
        save_file({"w": torch.full((4,), 1e5)}, run_dir / f"step-{step:06d}" / "model.safetensors")
    before = tree_digest(run_dir)
    code, err = run_cli(capsys, "merge", run_dir, "-o", tmp_path / "out", "--out-dtype", "float16", "--quiet")
    assert_failed_closed(code, err, tmp_path, before, run_dir, names=("'w'", "float16", "--allow-nonfinite"))
    code, _ = run_cli(capsys, "merge", run_dir, "-o", tmp_path / "new" / "deeper" / "out", "--out-dtype", "float16")
    assert code == 2 and not (tmp_path / "new").exists()  # folders made for the output are removed again
    code, _ = run_cli(capsys, "merge", run_dir, "-o", tmp_path / "out", "--out-dtype", "float16", "--allow-nonfinite",
                      "--quiet")
    assert code == 0
    from safetensors.torch import load_file

    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")["w"]).all()


def test_sidecar_symlinked_outside_is_not_copied(tmp_path, run, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "SECRET-TOKEN-1234"}')
    os.symlink(secret, run / "step-000200" / "config.json")
    os.symlink("../step-000100/model.safetensors", run / "step-000200" / "tokenizer.json")  # outside the checkpoint
    before = tree_digest(run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, err = run_cli(capsys, "merge", run, "-o", tmp_path / "out", "--quiet")
    assert code == 0 and "config.json" in err and "warning" in err  # a warning names each skipped file
    copied = tree_digest(tmp_path / "out")
    assert "config.json" not in copied and "tokenizer.json" not in copied
    assert not any(b"SECRET-TOKEN" in data for data in copied.values())
    assert tree_digest(run) == before


def test_one_subprocess_run_prints_one_line_and_no_traceback(tmp_path, run):
    import subprocess
    import sys

    raw_safetensors(run / "step-000200" / "model.safetensors", _w_and_b(entry(offsets=(8, 24))), DATA)
    proc = subprocess.run([sys.executable, "-m", "ckptmerge", "merge", str(run), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "overlap" in proc.stderr and "Traceback" not in proc.stderr
