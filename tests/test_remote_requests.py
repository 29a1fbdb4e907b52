"""How the remote safetensors reader plans its range requests (``io/remote_safetensors.py``), on a local file
served through a stand-in filesystem that records every ``cat_file``: no server needed; and every request a whole
``merge s3://run --last 4`` sends, through the test server's proxy (``tests/s3_server.py``)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from ckptmerge.io.remote import Url
from ckptmerge.io import remote_safetensors
from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader
from ckptmerge.io.remote_tree import RemoteObject
from s3_server import proxy, s3, s3_server  # noqa: F401 - fixtures


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


# --- a whole `merge s3://run --last 4`, request by request, through the test server's proxy -----------------------

def _kind(method: str, path: str, rng) -> str:
    import urllib.parse

    parsed = urllib.parse.urlparse(path)
    if method == "GET" and "list-type" in parsed.query:
        return "LIST"
    return f"{method}{' range' if rng else ''}" if method in ("GET", "HEAD") else method


def _write_run(tmp_path, layout: str):
    import json

    from conftest import make_state, write_checkpoint

    run = tmp_path / "run"
    for i in range(5):
        step = 100 * (i + 1)
        folder = write_checkpoint(run / f"checkpoint-{step}", make_state(i, dtype=torch.bfloat16, step=step), layout)
        if layout != "dcp":
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            (folder / "config.json").write_text(json.dumps({"model_type": "test", "torch_dtype": "bfloat16"}))
    (run / "tokenizer.json").write_text("{}")
    return run


def _merge_requests(tmp_path, s3, proxy, layout: str, prefix: str) -> list[tuple[str, str]]:
    from ckptmerge.cli.main import main
    from s3_server import upload

    upload(s3, _write_run(tmp_path, layout), prefix)
    proxy.requests.clear()
    assert main(["merge", f"s3://{prefix}", "--last", "4", "-o", str(tmp_path / "out"), "--quiet"]) == 0
    return [(_kind(m, p, r), p) for m, p, r in proxy.requests]


@pytest.mark.parametrize("layout", ["hf-safetensors", "dcp"])
def test_a_remote_merge_lists_the_run_once_and_verifies_with_one_more_listing(tmp_path, s3, proxy, layout):
    """Discovery's one listing serves pinning, opening and the sidecars; the inputs are listed again once, after
    reading (was: 14-15 LISTs, one after another). No HEAD; each small file and header is asked for once."""
    asked = _merge_requests(tmp_path, s3, proxy, layout, f"runs/requests-{layout}")
    kinds = [k for k, _ in asked]
    assert kinds.count("LIST") == 2 and kinds[0] == "LIST" and kinds[-1] == "LIST", asked
    assert "HEAD" not in kinds, asked
    whole = [p for k, p in asked if k == "GET"]
    assert len(whole) == len(set(whole)), whole  # trainer_state.json / .metadata and sidecars: one GET each
    if layout == "hf-safetensors":  # 5 trainer states, 4 headers (the whole of these small files), 2 sidecars
        assert len(whole) == 5 + 2 and kinds.count("GET range") == 4, asked
