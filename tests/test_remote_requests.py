"""How the remote safetensors reader plans its range requests (``io/remote_safetensors.py``), on a local file
served through a stand-in filesystem that records every ``cat_file``: no server needed."""

from __future__ import annotations

import threading

import torch
from safetensors.torch import save_file

from ckptmerge.io.remote import Url
from ckptmerge.io import remote_safetensors
from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader
from ckptmerge.io.remote_tree import RemoteObject


class RecordingFs:
    """``cat_file`` over local bytes; ``asked``: (offset, bytes) of each request; ``most`` requests at once."""

    def __init__(self, data: bytes):
        self.data, self.asked, self.running, self.most = data, [], 0, 0
        self._lock = threading.Lock()

    def cat_file(self, path, start, end):
        with self._lock:
            self.asked.append((start, end - start))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.data[start:end]
        finally:
            with self._lock:
                self.running -= 1


def _reader(tmp_path, state, **kw):
    save_file(state, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    fs = RecordingFs(data)
    obj = RemoteObject(Url("s3", "b/run/model.safetensors"), len(data), "etag")
    return RemoteSafetensorsReader(fs, [obj], display_path=Url("s3", "b/run"), **kw), fs, data


def test_rows_that_follow_each_other_share_requests_of_at_most_request_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(remote_safetensors, "HEAD_GUESS_BYTES", 4096)  # the header's request brings 4 KiB
    g = torch.Generator().manual_seed(0)
    state = {f"t{k:02d}": torch.randn(64, 256, generator=g) for k in range(12)}  # 64 KiB each, stored in name order
    state.update({f"n{k:02d}": torch.randn(256, generator=g) for k in range(6)})  # small ones: 1 KiB each
    reader, fs, data = _reader(tmp_path, state, concurrency=2, request_bytes=200_000)
    order = sorted(state, key=lambda n: reader._entries[n].begin)  # file order: runs of rows follow on
    keys = [k for n in order for k in ([(n, 0, 32), (n, 32, 64)] if n.startswith("t") else [(n, 0, 256)])]
    fs.asked.clear()
    reader.expect(keys)
    for name, start, stop in keys:
        assert torch.equal(reader.get_rows(name, start, stop), state[name][start:stop])
    reader.close()
    assert all(n <= 200_000 for _, n in fs.asked)
    ranges = sorted(fs.asked)
    assert sum(n for _, n in ranges) == sum(reader._where(*k)[2] for k in keys) - sum(
        max(0, min(4096, o + n) - o) for o, n in (reader._where(*k)[1:] for k in keys))  # header bytes not asked again
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # no byte twice
    asked_bytes = sum(n for _, n in fs.asked)
    assert len(fs.asked) == -(-asked_bytes // 200_000)  # every request full but the last: rows shared them
    assert fs.most <= 2


def test_a_row_asked_out_of_order_is_fetched_on_its_own_and_the_plan_goes_on(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {f"t{k}": torch.randn(16, 64, generator=g) for k in range(4)}
    reader, fs, _ = _reader(tmp_path, state, concurrency=1, request_bytes=1 << 20)
    keys = [(n, 0, 16) for n in sorted(state)]
    reader.expect(keys)
    assert torch.equal(reader.get_rows("t3", 0, 4), state["t3"][:4])  # not the next announced row
    for name, start, stop in keys:
        assert torch.equal(reader.get_rows(name, start, stop), state[name])
    reader.close()


def test_an_empty_row_range_and_a_scalar(tmp_path):
    state = {"empty": torch.zeros(0, 8), "scalar": torch.tensor(3.5), "w": torch.ones(4, 8)}
    reader, fs, _ = _reader(tmp_path, state, request_bytes=1 << 20)
    keys = [("empty", 0, 0), ("scalar", 0, 1), ("w", 0, 4)]
    reader.expect(keys)
    assert reader.get_rows("empty", 0, 0).shape == (0, 8)
    assert reader.get_rows("scalar", 0, 1).item() == 3.5
    assert torch.equal(reader.get_rows("w", 0, 4), state["w"])
    reader.close()
