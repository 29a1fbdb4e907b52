"""OutputFile: the bytes on disk are exactly the bytes written, direct, mapped or by pwrite, across page edges."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import ckptmerge.io.output_file as output_mod
from ckptmerge.io import libc
from ckptmerge.io.output_file import OutputFile


def pieces(seed: int) -> list[np.ndarray]:
    """Byte strings of awkward sizes: empty, one byte, window-straddling, several windows."""
    rng = np.random.default_rng(seed)
    window = 1 << 20
    sizes = [0, 1, 7, window - 3, 5, 2 * window + 11, 0, 4096, window, 13]
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


class Mode:
    def __init__(self, name):
        self.name, self.direct, self.calls = name, name == "direct", []


def _count_calls(mode: Mode, monkeypatch, cls) -> None:
    real = cls.write

    def counted(self, src, offset):
        mode.calls.append((offset, src.numel()))
        return real(self, src, offset)

    monkeypatch.setattr(cls, "write", counted)


@pytest.fixture(params=["direct", "mapped", "pwrite", "no fallocate"])
def mode(request, monkeypatch, tmp_path):
    """direct: large writes' whole pages bypass the page cache; mapped: large writes are stored through
    a map of their range; pwrite: every write is a pwrite (a filesystem not known to keep reserved
    blocks, e.g. btrfs); no fallocate: nothing reserved. Direct and mapped writes are counted, so a
    test knows they ran."""
    mode = Mode(request.param)
    if mode.name == "no fallocate":  # a filesystem without fallocate
        monkeypatch.setattr(libc, "fallocate", None)
    if mode.name in ("pwrite", "no fallocate"):
        _count_calls(mode, monkeypatch, output_mod._MappedWrites)  # none may happen
    if mode.name == "pwrite":
        monkeypatch.setattr(output_mod, "filesystem_type", lambda fd: 0x9123683E)  # btrfs
    if mode.name == "mapped":
        _skip_unless_mappable(tmp_path)
        monkeypatch.setattr(output_mod, "PROBE_WRITES", 0)  # every large write mapped, from the first
        _count_calls(mode, monkeypatch, output_mod._MappedWrites)
    if mode.direct:
        (tmp_path / "probe").write_bytes(b"")
        direct = output_mod._DirectWrites.open(tmp_path / "probe")
        if direct is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        direct.close()
        _count_calls(mode, monkeypatch, output_mod._DirectWrites)
    yield mode
    if mode.name in ("pwrite", "no fallocate"):
        assert mode.calls == []
    if mode.direct:
        assert all(n % output_mod.DIRECT_ALIGN == 0 for _, n in mode.calls), mode.calls
    if mode.name == "mapped":
        assert all(n >= output_mod.MAPPED_MIN_BYTES for _, n in mode.calls), mode.calls
        assert not mode.calls or any(offset % 4096 for offset, _ in mode.calls)  # maps begin before the first byte


def test_bytes_on_disk_equal_the_bytes_written(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(output_mod, "WRITEBACK_BYTES", 1 << 20)  # exercise sync_file_range many times
    data = pieces(0)
    total = sum(p.size for p in data)
    path = tmp_path / "out.bin"
    with OutputFile(path, total, direct=mode.direct) as out:
        assert out.reserved == (mode.name != "no fallocate") and out.direct == mode.direct
        for i, piece in enumerate(data):
            out.write(piece.tobytes() if i % 2 else torch.from_numpy(piece))
        assert out.position == total
    assert path.read_bytes() == b"".join(p.tobytes() for p in data)
    if mode.direct or mode.name == "mapped":  # pieces of 1 MiB and more: direct or mapped (direct: not their edges)
        assert mode.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensors_are_written_as_they_lie_in_memory(tmp_path, mode, dtype):
    values = (torch.randn(3001, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    expected = values.view(torch.int16).numpy().tobytes() if dtype == torch.bfloat16 else values.numpy().tobytes()
    path = tmp_path / "t.bin"
    with OutputFile(path, len(expected), direct=mode.direct) as out:
        out.write(values[:1000])
        out.write(values[1000:].reshape(1, -1))
    assert path.read_bytes() == expected


def test_writing_past_the_declared_size_is_refused(tmp_path, mode):
    with OutputFile(tmp_path / "x.bin", 10, direct=mode.direct) as out:
        out.write(b"0123456789")
        with pytest.raises(RuntimeError, match="declared 10"):
            out.write(b"!")


def test_the_disk_is_reserved_before_anything_is_written(tmp_path, monkeypatch):
    reserved = []

    def fake_fallocate(fd, mode, offset, nbytes):
        reserved.append((mode, offset, nbytes, os.fstat(fd).st_size))
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(libc, "fallocate", fake_fallocate)
    with pytest.raises(OSError) as info:
        OutputFile(tmp_path / "big.bin", 123456)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "big.bin")
    assert reserved == [(0, 0, 123456, 0)]


def test_a_filesystem_without_fallocate_falls_back_to_writes(tmp_path, monkeypatch):
    def unsupported(*_):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(libc, "fallocate", unsupported)
    with OutputFile(tmp_path / "f.bin", 3) as out:
        assert not out.reserved
        out.write(b"abc")
    assert (tmp_path / "f.bin").read_bytes() == b"abc"


def _skip_unless_mappable(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    fs = output_mod.filesystem_type(fd)
    os.close(fd)
    if fs not in output_mod._MAPPABLE_FILESYSTEMS:
        pytest.skip(f"the temporary folder's filesystem ({fs}) is not one that mapped writes use")


class _CopyClock:
    """Stands in for ``time`` in output_file: each large pwrite seems to take the next CPU seconds given."""

    def __init__(self, seconds_per_write):
        self._durations, self._now, self._started = list(seconds_per_write), 0.0, False

    def thread_time(self) -> float:
        if self._started:  # the reading after a pwrite
            self._now += self._durations.pop(0)
        self._started = not self._started
        return self._now


@pytest.mark.parametrize("copy_s, first_mapped", [
    ([1e-6] * 8, None),                        # 1 MiB copies at ~1 TB/s: never mapped
    ([1.0] * 8, 3),                            # ~1 MB/s from the first: mapped after PROBE_WRITES
    ([1e-6] * 3 + [1.0] * 5, 5),               # fast while memory freed just before lasts, then slow
    ([1.0, 1e-6, 1e-6] * 2 + [1.0, 1e-6], None),  # one slow copy in any three is not enough
])
def test_maps_once_the_latest_large_pwrites_were_slow(tmp_path, monkeypatch, copy_s, first_mapped):
    """Large pwrites are measured until the median of the last PROBE_WRITES is under the threshold;
    every large write after that is mapped, and the file holds the same bytes either way."""
    _skip_unless_mappable(tmp_path)
    monkeypatch.setattr(output_mod, "PROBE_WRITES", 3)
    monkeypatch.setattr(output_mod, "time", _CopyClock(copy_s))
    mode = Mode("mapped")
    _count_calls(mode, monkeypatch, output_mod._MappedWrites)
    size = output_mod.MAPPED_MIN_BYTES + 4097
    blob = np.random.default_rng(2).integers(0, 256, size * len(copy_s) + 5, dtype=np.uint8)
    with OutputFile(tmp_path / "probe.bin", blob.size) as out:
        out.write(blob[:5].tobytes())  # small: not measured
        for i in range(len(copy_s)):
            assert out.mapped == (first_mapped is not None and i >= first_mapped), i
            out.write(torch.from_numpy(blob[5 + i * size:5 + (i + 1) * size]))
    assert len(mode.calls) == (0 if first_mapped is None else len(copy_s) - first_mapped)
    assert (tmp_path / "probe.bin").read_bytes() == blob.tobytes()


def test_closing_early_leaves_the_reserved_size(tmp_path):
    out = OutputFile(tmp_path / "partial.bin", 3 << 20)
    out.write(b"x" * 100)
    out.close()
    out.close()  # idempotent
    assert os.path.getsize(tmp_path / "partial.bin") == 3 << 20


def test_threads_writing_disjoint_ranges_in_any_order(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(output_mod, "WRITEBACK_BYTES", 1 << 20)
    data = pieces(1)
    blob = b"".join(p.tobytes() for p in data)
    offsets = [sum(p.size for p in data[:i]) for i in range(len(data))]
    jobs = list(zip(offsets, data))
    random.Random(0).shuffle(jobs)
    with OutputFile(tmp_path / "par.bin", len(blob), direct=mode.direct) as out, ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(lambda job: out.write_at(job[0], torch.from_numpy(job[1])), jobs)) == len(blob)
    assert (tmp_path / "par.bin").read_bytes() == blob
    if mode.direct or mode.name == "mapped":
        assert mode.calls


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 2e-2), ("float16", 2e-3)])
def test_merge_writes_the_same_bytes_by_pwrite_maps_and_direct_io(tmp_path, monkeypatch, dtype, atol):
    """`ckptmerge merge --dtype D` with every large write a pwrite, with every one mapped, and with
    `--direct-io`: the same file, equal to an fp64 NumPy average."""
    from safetensors.torch import load_file, save_file

    from ckptmerge.cli.main import main

    g = torch.Generator().manual_seed(3)
    states = [{"big": torch.randn(4001, 701, generator=g), "small": torch.randn(5, 3, generator=g)} for _ in range(3)]
    for step, state in zip((100, 200, 300), states):
        (tmp_path / "run" / f"step-{step:06d}").mkdir(parents=True)
        save_file(state, tmp_path / "run" / f"step-{step:06d}" / "model.safetensors")
    calls = {"direct": [], "mapped": []}
    for name, cls in (("direct", output_mod._DirectWrites), ("mapped", output_mod._MappedWrites)):
        real = cls.write
        monkeypatch.setattr(cls, "write", lambda self, src, offset, real=real, name=name:
                            calls[name].append(offset) or real(self, src, offset))
    modes = {"pwrite": ([], 0.0, 3), "mapped": ([], 0.0, 0), "direct": (["--direct-io"], 0.0, 3)}
    for name, (flags, slow_below, probes) in modes.items():
        monkeypatch.setattr(output_mod, "MAPPED_BELOW_BYTES_PER_S", slow_below)  # 0: pwrite is never slow
        monkeypatch.setattr(output_mod, "PROBE_WRITES", probes)  # 0: map from the first large write
        assert main(["merge", str(tmp_path / "run"), "-o", str(tmp_path / name), "--quiet", "--chunk-size", "4MB",
                     "--out-dtype", dtype, "--schedule", "ema", "--alpha", "0.3", *flags]) == 0
    probe = output_mod._DirectWrites.open(tmp_path / "direct" / "model.safetensors")
    if probe is not None:  # this filesystem takes O_DIRECT: the direct merge used it
        probe.close()
        assert calls["direct"]
    fd = os.open(tmp_path, os.O_RDONLY)
    mappable = output_mod.filesystem_type(fd) in output_mod._MAPPABLE_FILESYSTEMS
    os.close(fd)
    if mappable:
        assert len(calls["mapped"]) >= 2  # the mapped merge mapped its large chunks
    files = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in modes}
    assert files["mapped"] == files["pwrite"] and files["direct"] == files["pwrite"]
    expected = states[0]["big"].double().numpy()  # PMA's EMA recursion, seeded with the oldest, in fp64
    for state in states[1:]:
        expected = 0.3 * state["big"].double().numpy() + 0.7 * expected
    merged = load_file(tmp_path / "mapped" / "model.safetensors")["big"]  # safetensors' own reader
    assert merged.dtype == getattr(torch, dtype)
    assert np.allclose(merged.double().numpy(), expected, rtol=0, atol=atol)
