"""The streaming engine (read-ahead, slices, every core) gives the very bits of the plain sequential loop."""

import threading
import time

import pytest
import torch
from conftest import FLOAT_DTYPES, make_state, write_series
from safetensors.torch import load_file

from ckptmerge import compute_coeffs, discover, merge
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.chunk_steps import ReadSettings
from ckptmerge.merging.engine import run_engine
from ckptmerge.merging.memory import DictSink
from ckptmerge.merging.plan import build_plan
from ckptmerge.merging.schedules import SCHEDULES, SIGNED

PARAMS = {"ema": {"alpha": 0.3}, "pair": {"lam": 0.65}, "custom": {"weights": [0.1, 0.2, 0.3, 0.4]},
          "swa": {"start_step": 200}}
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# default slots; small slots (many parts, reused buffers); slots splitting rows at odd element counts,
# with row chunks, and parts large enough to be split across threads
SETTINGS = [(ReadSettings(), 256 << 20), (ReadSettings(slot_bytes=3000, slots=3), 256 << 20),
            (ReadSettings(slot_bytes=(1 << 20) + 12, slots=2), 300_000)]


def sequential_merge(states, coeffs, accum=torch.float32):
    """The merge written out plainly: per tensor, ``acc = 0; acc += c_i * x_i`` in input order, then the cast."""
    out = {}
    for name, newest in states[-1].items():
        if not newest.dtype.is_floating_point:
            out[name] = newest
            continue
        acc = torch.zeros(newest.shape, dtype=accum)
        for c, state in zip(coeffs, states):
            if c != 0.0:
                acc.add_(state[name], alpha=c)
        out[name] = acc.to(newest.dtype)
    return out


def assert_same_bits(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if value.dtype in BITS:
            assert torch.equal(got[name].view(BITS[value.dtype]), value.view(BITS[value.dtype])), name
        else:
            assert torch.equal(got[name], value), name


def big_state(seed, dtype, step):
    """make_state plus a tensor of 266,760 elements (odd rows and columns), above the size split across threads."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {**make_state(seed, dtype, step), "big.weight": torch.randn(520, 513, generator=g).to(dtype)}


class SlowSink(DictSink):
    """Takes its time before reading each chunk: a buffer reused too early would be caught changing."""

    def write(self, name, chunk):
        time.sleep(0.005)
        super().write(name, chunk)


class OrderSink(DictSink):
    """Records which thread delivered each chunk, in arrival order."""

    def __init__(self, shapes):
        super().__init__(shapes)
        self.order = []

    def write_rows(self, name, start_row, chunk):
        self.order.append((name, start_row, threading.get_ident()))
        super().write_rows(name, start_row, chunk)


def engine_merge(paths, coeffs, reads, chunk_bytes, accum=torch.float32, device="cpu", write_behind=False,
                 workers=None, sink_type=None):
    """``workers=1`` (or a CUDA device) takes the sequential loop; otherwise one worker per torch thread."""
    readers = [open_checkpoint(p) for p in paths]
    try:
        plan = build_plan(readers, [CheckpointRef(r.path) for r in readers], coeffs, accum_dtype=accum)
        sink_type = sink_type or (SlowSink if write_behind else DictSink)
        sink = sink_type({t.name: (t.shape, t.out_dtype) for t in plan.tasks})
        run_engine(plan, readers, sink, chunk_bytes=chunk_bytes, reads=reads, device=device, write_behind=write_behind,
                   workers=workers)
        return sink.tensors if sink_type is not OrderSink else (sink.tensors, sink.order)
    finally:
        for reader in readers:
            reader.close()


@pytest.fixture
def three_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(3)  # the engine splits work across torch's thread count, whatever this machine has
    yield
    assert torch.get_num_threads() == 3, "the engine must give torch its thread count back"
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES.keys() - SIGNED))  # phema: tests/test_posthoc_ema.py
def test_every_schedule_and_dtype_gives_the_sequential_bits(tmp_path, schedule, dtype, three_threads):
    states = [big_state(seed, FLOAT_DTYPES[dtype], step=seed) for seed in range(4)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    if schedule == "pair":
        refs, states = refs[-2:], states[-2:]
    coeffs = compute_coeffs(schedule, refs, **PARAMS.get(schedule, {}))
    expected = sequential_merge(states, coeffs)
    for reads, chunk_bytes in SETTINGS:
        for workers in (None, 1):  # chunk workers (3, one per torch thread) and the sequential loop
            assert_same_bits(engine_merge([r.path for r in refs], coeffs, reads, chunk_bytes, workers=workers),
                             expected)


def test_workers_write_chunks_out_of_order_and_every_row_once(tmp_path, three_threads):
    """The parallel path really runs: 3 workers (one per torch thread) each deliver their share of the row chunks."""
    states = [big_state(seed, torch.float32, step=seed) for seed in range(3)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    got, order = engine_merge([r.path for r in refs], [0.2, 0.3, 0.5], ReadSettings(slot_bytes=4096, slots=2),
                              chunk_bytes=20_000, sink_type=OrderSink)
    assert_same_bits(got, sequential_merge(states, [0.2, 0.3, 0.5]))
    big = [(start, thread) for name, start, thread in order if name == "big.weight"]
    assert sorted(start for start, _ in big) == list(range(0, 520, 9))  # 9 rows of 513 fp32 fit in 20,000 bytes
    assert len({thread for _, thread in big}) == 3 and threading.get_ident() not in {thread for _, thread in big}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_writing_behind_a_slow_sink_gives_the_sequential_bits(tmp_path, dtype, three_threads):
    """Chunks written on a thread while the next is merged (double-buffered scratch tensors)."""
    states = [big_state(seed, FLOAT_DTYPES[dtype], step=seed) for seed in range(4)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    coeffs = compute_coeffs("ema", refs, alpha=0.3)
    for reads, chunk_bytes in SETTINGS:
        got = engine_merge([r.path for r in refs], coeffs, reads, chunk_bytes, write_behind=True, workers=1)
        assert_same_bits(got, sequential_merge(states, coeffs))


def test_file_merge_writes_the_sequential_bits(tmp_path, three_threads):
    states = [big_state(seed, torch.bfloat16, step=seed) for seed in range(3)]
    write_series(tmp_path / "run", states)
    refs = discover(tmp_path / "run").checkpoints
    coeffs = compute_coeffs("ema", refs, alpha=0.4)
    merge(refs, coeffs, tmp_path / "out", progress=False, device="cpu")
    assert_same_bits(load_file(tmp_path / "out" / "model.safetensors"), sequential_merge(states, coeffs))
    merge(refs, coeffs, tmp_path / "f64", progress=False, accum_dtype=torch.float64)
    assert_same_bits(load_file(tmp_path / "f64" / "model.safetensors"), sequential_merge(states, coeffs, torch.float64))


def test_mixed_layouts_give_the_sequential_bits(tmp_path, three_threads):
    """Inputs that are not plain byte ranges (a torch file here) are summed from their own tensors."""
    states = [big_state(seed, torch.float32, step=seed) for seed in range(3)]
    paths = [write_series(tmp_path / f"run{i}", [s], layout=layout, steps=[100 * (i + 1)])[0]
             for i, (s, layout) in enumerate(zip(states, ["hf-safetensors", "hf-bin", "hf-safetensors"]))]
    coeffs = [0.2, 0.3, 0.5]
    for reads, chunk_bytes in SETTINGS:
        assert_same_bits(engine_merge(paths, coeffs, reads, chunk_bytes), sequential_merge(states, coeffs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accumulating_on_cuda_gives_the_cpu_bits(tmp_path, dtype):
    states = [big_state(seed, FLOAT_DTYPES[dtype], step=seed) for seed in range(4)]
    paths = write_series(tmp_path / "run", states)
    coeffs = [0.1, 0.2, 0.3, 0.4]
    for reads, chunk_bytes in SETTINGS:
        got = engine_merge(paths, coeffs, reads, chunk_bytes, device="cuda")
        assert all(t.device.type == "cpu" for t in got.values())
        assert_same_bits(got, sequential_merge(states, coeffs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without CUDA")
def test_cli_device_without_cuda_is_a_one_line_error_and_writes_nothing(tmp_path, series, capsys):
    from ckptmerge.cli.main import main

    run_dir, _, _ = series
    assert main(["merge", str(run_dir), "-o", str(tmp_path / "out"), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err
    assert not (tmp_path / "out").exists()
