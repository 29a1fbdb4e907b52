"""DeepSpeed's fp32 masters at a URL (``io/remote_zero.py``): ZeRO 3 runs, and ``--fp32-masters`` on ZeRO 2, read from
every rank's optimizer file by ranges of the master records only, never the moments beside them; and accelerate's
``checkpoint_K`` folders, whose step is read from ``optimizer.bin``'s data.pkl and its ``step`` records only.

The runs are written here in DeepSpeed's file layout (the keys and record order ``engine.save_checkpoint`` writes:
Adam's moments, then the fp32 partitions; ZeRO 3 shares padded on the last rank), on 3 ranks, so no DeepSpeed
launch is needed; ``test_a_zero3_run_saved_by_deepspeed_...`` checks one that DeepSpeed itself wrote (2 gloo ranks)
against its own ``zero_to_fp32``. Each run is uploaded to the moto server (``tests/s3_server.py``) and checked
against its local copy: ``inspect`` line for line, ``merge --last 2`` bit for bit and against the fp64 NumPy mean,
and the bytes asked of each object, counted at the proxy."""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import reference_merge
from safetensors.torch import save_file

from ckptmerge.cli.main import main
from s3_server import SECRET, proxy, s3, s3_server, upload  # noqa: F401 - fixtures
from trainer_checks import merged_tensors

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEPS = (10, 20, 30)
WORLD = 3
GROUPS = [{"0.weight": (96, 70), "0.bias": (97,)}, {"2.weight": (50, 96), "2.bias": (5,)}]  # numels not / 3
BIG_GROUPS = [{"0.weight": (512, 341), "0.bias": (341,)}, {"2.weight": (301, 512), "2.bias": (7,)}]  # 1.3 MB of fp32
BUFFER = "1.running_scale"


def _states(groups=GROUPS, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The full fp32 masters (and one fp32 buffer) of each checkpoint."""
    g = torch.Generator().manual_seed(seed)
    shapes = {name: shape for group in groups for name, shape in group.items()} | {BUFFER: (16,)}
    return [{name: torch.randn(*shape, generator=g) for name, shape in shapes.items()} for _ in STEPS]


def _adam(vectors: list[torch.Tensor], step: int) -> dict:
    return {"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn_like(v),
                          "exp_avg_sq": torch.rand_like(v)} for i, v in enumerate(vectors)},
            "param_groups": [{"lr": 0.01, "params": [i]} for i in range(len(vectors))]}


def _model_states(state: dict, groups, step: int, module: dict) -> dict:
    return {"module": {**module, BUFFER: state[BUFFER]}, "buffer_names": [BUFFER], "optimizer": None,
            "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in group.items()) for group in groups],
            "frozen_param_shapes": {}, "shared_params": {}, "frozen_param_fragments": {}, "lr_scheduler": None,
            "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": step,
            "global_samples": 8 * step, "dp_world_size": WORLD, "mp_world_size": 1, "ds_config": {"train_batch_size": 8},
            "ds_version": "0.19.8"}


def _zero3(run, states, groups=GROUPS):
    """``engine.save_checkpoint`` under ZeRO 3, bf16, on ``WORLD`` ranks: every parameter split in
    ``ceil(numel / WORLD)`` shares, one per rank, at the same offset of each rank's flat fp32 group (the last share
    padded); the model states' ``module`` holds empty placeholders."""
    for step, state in zip(STEPS, states):
        tag = run / f"global_step{step}"
        tag.mkdir()
        for rank in range(WORLD):
            vectors = []
            for group in groups:
                shares = []
                for name in group:
                    flat, share = state[name].reshape(-1), math.ceil(state[name].numel() / WORLD)
                    piece = flat[rank * share:(rank + 1) * share]
                    shares.append(torch.cat([piece, torch.zeros(share - piece.numel())]))
                vectors.append(torch.cat(shares))
            torch.save({"optimizer_state_dict": {
                "zero_stage": 3, "loss_scaler": None, "dynamic_loss_scale": False, "overflow": False,
                "partition_count": WORLD, "optimizer_state_dict": _adam(vectors, step), "fp32_flat_groups": vectors},
                "ds_config": {"zero_optimization": {"stage": 3}}, "ds_version": "0.19.8"},
                tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            placeholders = {n: torch.empty(0, dtype=torch.bfloat16) for group in groups for n in group}
            torch.save(_model_states(state, groups, step, placeholders), tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    (run / "latest").write_text(f"global_step{STEPS[-1]}")
    (run / "zero_to_fp32.py").write_text("# DeepSpeed's conversion script\n")


def _zero2(run, states, groups=GROUPS):
    """ZeRO 2, bf16, on ``WORLD`` ranks: the bf16 module in ``mp_rank_00_model_states.pt``, each group's fp32
    vector (padded to a multiple of ``WORLD``) split into one partition per rank's optimizer file."""
    for step, state in zip(STEPS, states):
        tag = run / f"global_step{step}"
        tag.mkdir()
        module = {n: state[n].bfloat16() for group in groups for n in group}
        torch.save(_model_states(state, groups, step, module), tag / "mp_rank_00_model_states.pt")
        fulls = [torch.cat([state[n].reshape(-1) for n in group]) for group in groups]
        fulls = [torch.cat([f, torch.zeros(-f.numel() % WORLD)]) for f in fulls]
        for rank in range(WORLD):
            parts = [f.chunk(WORLD)[rank].clone() for f in fulls]
            torch.save({"optimizer_state_dict": {
                "loss_scaler": None, "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
                "base_optimizer_state": _adam(parts, step), "single_partition_of_fp32_groups": parts,
                "zero_stage": 2, "group_paddings": [0] * len(parts), "partition_count": WORLD},
                "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.19.8"},
                tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (run / "latest").write_text(f"global_step{STEPS[-1]}")


def _requests(proxy) -> tuple[int, list[str], dict[str, list[tuple[int, int]]], int]:
    """(LISTs, whole-object GETs, byte ranges asked per key as [start, stop), HEADs) among the proxy's requests."""
    lists, whole, ranges, heads = 0, [], {}, 0
    for method, path, header in proxy.requests:
        parsed = urllib.parse.urlparse(path)
        key = urllib.parse.unquote(parsed.path).lstrip("/")
        if method == "HEAD":
            heads += 1
        elif method == "GET" and "list-type" in parsed.query:
            lists += 1
        elif method == "GET" and not header:
            whole.append(key)
        elif method == "GET":
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
            ranges.setdefault(key, []).append((int(match[1]), int(match[2]) + 1))
    return lists, whole, ranges, heads


def _record_bytes(file, keep) -> list[tuple[int, int]]:
    """[start, stop) of the data of each storage record of torch file ``file`` whose tensor ``keep(path)`` names."""
    from ckptmerge.io.torch_file_rewrite import load_tensor_refs

    refs = load_tensor_refs(file)
    wanted = {ref.key for path, ref in _walk(refs, ()) if keep(path)}
    out = []
    with zipfile.ZipFile(file) as archive, open(file, "rb") as raw:
        for info in archive.infolist():
            key = info.filename.rsplit("/data/", 1)[-1] if "/data/" in info.filename else None
            if key in wanted:
                raw.seek(info.header_offset + 26)
                name, extra = int.from_bytes(raw.read(2), "little"), int.from_bytes(raw.read(2), "little")
                start = info.header_offset + 30 + name + extra
                out.append((start, start + info.file_size))
    return out


def _walk(obj, path):
    from ckptmerge.io.torch_file_rewrite import TensorRef

    if isinstance(obj, TensorRef):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _is_master(path: tuple) -> bool:
    return "fp32_flat_groups" in path or "single_partition_of_fp32_groups" in path


def _check_merge(tmp_path, local_run, url: str, states, *flags: str) -> dict[str, torch.Tensor]:
    """merge --last 2 of the URL equals the local copy's bit for bit and the fp64 NumPy mean of the masters."""
    assert main(["merge", str(local_run), "--last", "2", "-o", str(tmp_path / "local-out"), "--quiet", *flags]) == 0
    assert main(["merge", url, "--last", "2", "-o", str(tmp_path / "remote-out"), "--quiet", *flags]) == 0
    local_t, remote_t = merged_tensors(tmp_path / "local-out"), merged_tensors(tmp_path / "remote-out")
    assert sorted(remote_t) == sorted(states[0]) and local_t.keys() == remote_t.keys()
    for name in local_t:
        assert remote_t[name].dtype == local_t[name].dtype == torch.float32, name
        assert torch.equal(local_t[name], remote_t[name]), name
    for name, want in reference_merge(states[1:], [0.5, 0.5]).items():
        np.testing.assert_allclose(remote_t[name].to(torch.float64).numpy(), want, rtol=0, atol=1e-6, err_msg=name)
    manifest = json.loads((tmp_path / "remote-out" / "merge.json").read_text())
    assert all(i["path"].startswith(url + "/") and i["content_hash"].startswith("etag-sha256:")
               for i in manifest["inputs"])
    return remote_t


def _same_table(run, url: str, proxy, capsys) -> None:
    """``inspect`` of the URL prints the local copy's table line for line, with the run's steps; the proxy then
    holds the URL's requests alone."""
    assert main(["inspect", str(run)]) == 0
    local = capsys.readouterr().out
    proxy.requests.clear()
    assert main(["inspect", url]) == 0
    remote = capsys.readouterr().out
    assert remote.splitlines() == local.splitlines()
    assert [line.split()[1] for line in remote.splitlines()[2:5]] == [str(s) for s in STEPS], remote


@pytest.mark.parametrize("kind", ["zero3", "zero2-fp32-masters"])
def test_deepspeed_masters_at_a_url_inspect_and_merge_like_the_local_copy(tmp_path, s3, proxy, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    states = _states()
    (_zero3 if kind == "zero3" else _zero2)(run, states)
    flags = () if kind == "zero3" else ("--fp32-masters",)
    upload(s3, run, f"runs/{kind}")
    url = f"s3://runs/{kind}"

    _same_table(run, url, proxy, capsys)
    lists, whole, _, heads = _requests(proxy)
    assert heads == 0 and not any(k.endswith((".pt",)) for k in whole), whole  # pickles: ranges only

    proxy.requests.clear()
    _check_merge(tmp_path, run, url, states, *flags)
    lists, whole, ranges, heads = _requests(proxy)
    assert heads == 0 and not any(k.endswith(".pt") for k in whole), whole
    assert lists <= 1 + 4 * 2 + 2, lists  # discovery (and is-run), then per input: pin, open, verify
    assert SECRET not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["zero3", "zero2-fp32-masters"])
def test_only_the_master_records_are_read_each_byte_once(tmp_path, s3, proxy, kind):
    """1.3 MB of masters per checkpoint beside 2.6 MB of Adam moments: ``merge --last 2`` asks every byte of every
    master record of the two merged tags once, no byte of any object twice, no byte of the moments; the bytes asked
    of the optimizer files are within 2% of the masters' (the zip directory, data.pkl and 30-byte local headers
    besides), and the requests per optimizer file are a handful, not one per parameter."""
    run = tmp_path / "run"
    run.mkdir()
    states = _states(BIG_GROUPS, seed=1)
    (_zero3 if kind == "zero3" else _zero2)(run, states, BIG_GROUPS)
    upload(s3, run, f"runs/bytes-{kind}")
    flags = () if kind == "zero3" else ("--fp32-masters",)
    proxy.requests.clear()
    assert main(["merge", f"s3://runs/bytes-{kind}", "--last", "2", "-o", str(tmp_path / "remote-out"), "--quiet",
                 *flags]) == 0
    _, whole, ranges, _ = _requests(proxy)
    assert not whole or all(not k.endswith(".pt") for k in whole), whole
    masters = asked = 0
    for file in sorted(run.rglob("*optim_states.pt")):
        key = f"runs/bytes-{kind}/{file.relative_to(run).as_posix()}"
        got = sorted(ranges.get(key, []))
        covered = np.zeros(file.stat().st_size, dtype=np.int8)
        for a, b in got:
            covered[a:b] += 1
        assert covered.max(initial=0) <= 1, (key, got, np.flatnonzero(covered > 1)[:5])  # no byte asked twice
        moments = _record_bytes(file, lambda path: "exp_avg" in path or "exp_avg_sq" in path)
        assert all(not covered[a:b].any() for a, b in moments), key  # Adam's moments never asked for
        if "global_step10" in key:  # not merged: nothing of its optimizer files
            assert not got, (key, got)
            continue
        records = _record_bytes(file, _is_master)
        uncovered = sum(int((covered[a:b] == 0).sum()) for a, b in records)
        assert uncovered <= 4 * WORLD * 4, (key, uncovered)  # every master byte but the padding of the last shares
        masters += sum(b - a for a, b in records)
        asked += sum(b - a for a, b in got)
        assert len(got) <= 10, (key, got)  # directory and data.pkl 5, local headers 2, masters 2 (one per group)
    assert masters >= 2 * 4 * 329_052  # two merged tags: 1.3 MB of masters each
    assert masters <= asked <= 1.02 * masters, (asked, masters)
    print(f"{kind}: bytes asked of the optimizer files {asked:,} for {masters:,} bytes of masters "
          f"({asked / masters:.4f}x)")


def test_a_remote_masters_reader_never_reads_a_whole_optimizer_file(tmp_path, s3):
    """The reader's own count: no request for a whole optimizer file, nor a read-ahead beyond the master rows."""
    from ckptmerge.io.remote import Url
    from ckptmerge.io.remote_layout import open_remote_checkpoint
    from ckptmerge.io.remote_zero import RemoteZeroMastersReader

    run = tmp_path / "run"
    run.mkdir()
    states = _states(BIG_GROUPS, seed=2)
    _zero3(run, states, BIG_GROUPS)
    upload(s3, run, "runs/reader-zero3")
    sizes, fetched = {}, []
    reader = open_remote_checkpoint(Url("s3", "runs/reader-zero3/global_step30"))
    assert isinstance(reader, RemoteZeroMastersReader)
    with reader:
        for file in (run / "global_step30").glob("*optim_states.pt"):
            sizes[file.name] = file.stat().st_size
        keys = reader.keys()
        reader.expect([(k, 0, reader.info(k).shape[0]) for k in keys if k != BUFFER])
        for k in keys:
            want = states[-1][k]
            got = reader.get_rows(k, 0, want.shape[0])
            assert torch.equal(got, want), k
        fetched.append(reader.stats)
    stats = fetched[0]
    masters = 4 * sum(math.prod(s) for group in BIG_GROUPS for s in group.values())
    assert stats.bytes_requested < masters * 1.001 + 4096, (stats, masters)  # rows, padding and 30-byte headers
    assert stats.requests <= WORLD * 2 + WORLD * 2 * 2, stats  # headers, then a few requests per rank
    assert stats.bytes_requested < min(sizes.values()), (stats, sizes)


def _accelerate_automatic(run, states):
    """``automatic_checkpoint_naming``: ``checkpoint_K`` counts saves; the step is in ``optimizer.bin`` (one
    ``step`` tensor per parameter among the moments); parameter 1's step lags (it had no gradient once)."""
    for k, (step, state) in enumerate(zip(STEPS, states)):
        folder = run / f"checkpoint_{k}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors")
        torch.save({"state": {i: {"step": torch.tensor(float(step - (i == 1))), "exp_avg": torch.randn_like(v),
                                  "exp_avg_sq": torch.rand_like(v)} for i, v in enumerate(state.values())},
                    "param_groups": [{"lr": 0.05, "params": list(range(len(state)))}]}, folder / "optimizer.bin")
        torch.save({"random_state": 1}, folder / "random_states_0.pkl")
        torch.save({"last_epoch": 2 * step}, folder / "scheduler.bin")  # accelerate steps it once per process


def test_accelerate_checkpoint_k_at_a_url_reads_the_step_records_only(tmp_path, s3, proxy, capsys):
    run = tmp_path / "run"
    run.mkdir()
    states = _states(BIG_GROUPS, seed=3)
    _accelerate_automatic(run, states)
    upload(s3, run, "runs/accelerate-k")
    url = "s3://runs/accelerate-k"
    _same_table(run, url, proxy, capsys)
    _, whole, ranges, heads = _requests(proxy)
    assert heads == 0 and not any(k.endswith("optimizer.bin") for k in whole), whole
    for file in sorted(run.rglob("optimizer.bin")):
        key = f"runs/accelerate-k/{file.relative_to(run).as_posix()}"
        got = ranges[key]
        covered = np.zeros(file.stat().st_size, dtype=np.int8)
        for a, b in got:
            covered[a:b] += 1
        assert covered.max() <= 1, (key, got)
        moments = _record_bytes(file, lambda path: "exp_avg" in path or "exp_avg_sq" in path)
        assert all(not covered[a:b].any() for a, b in moments), key  # the moments are never asked for
        steps = _record_bytes(file, lambda path: "step" in path)
        assert all(covered[a:b].all() for a, b in steps), key
        # the zip directory and data.pkl (a few requests), then one request per parameter's step, sent together
        assert sum(b - a for a, b in got) < 16 * 1024 and len(got) <= 6 + len(steps), (key, got)
    _check_merge(tmp_path, run, url, states)
