"""Read-ahead pool and CPU thread splitting, checked against plain file reads and whole-tensor operations."""

import os

import pytest
import torch

from ckptmerge.errors import CheckpointFormatError, ConfigError
from ckptmerge.io.read_ahead import ReadAhead
from ckptmerge.io.tensor_info import FileRange
from ckptmerge.merging.cpu_threads import MIN_PARALLEL_ELEMENTS, PARTS_PER_THREAD, CpuThreads
from ckptmerge.merging.device import resolve_device


@pytest.fixture
def two_files(tmp_path):
    paths = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, path in enumerate(paths):
        path.write_bytes(os.urandom(5000 + 17 * i))
    return paths


def expected_bytes(rng):
    with open(rng.path, "rb") as f:
        f.seek(rng.offset)
        return f.read(rng.nbytes)


def test_ranges_come_back_in_order_with_the_files_bytes_in_at_most_slots_buffers(two_files):
    a, b = two_files
    ranges = [FileRange(a, 0, 700), FileRange(b, 0, 1), FileRange(a, 700, 1000), FileRange(b, 4000, 1017),
              FileRange(a, 4999, 1), FileRange(b, 1, 999)] * 4
    buffers = set()
    with ReadAhead(ranges, slot_bytes=1024, slots=3) as ahead:
        for rng in ranges:
            slot = ahead.next()
            assert slot.range == rng
            assert slot.data.numpy().tobytes() == expected_bytes(rng)
            buffers.add(slot.buffer.data_ptr())
            ahead.release(slot)
    assert len(buffers) <= 3


def test_a_slot_is_refilled_only_after_its_fence(two_files):
    class Fence:
        done = False

        def synchronize(self):
            self.done = True

    fence = Fence()
    ranges = [FileRange(two_files[0], 0, 10), FileRange(two_files[0], 10, 10)]
    with ReadAhead(ranges, slot_bytes=16, slots=1) as ahead:
        first = ahead.next()
        assert first.data.numpy().tobytes() == expected_bytes(ranges[0])
        ahead.release(first, fence)
        second = ahead.next()
        assert fence.done and second.buffer.data_ptr() == first.buffer.data_ptr()
        assert second.data.numpy().tobytes() == expected_bytes(ranges[1])


def test_a_file_shorter_than_its_range_raises_a_clear_error(two_files):
    rng = FileRange(two_files[0], 4990, 20)
    with ReadAhead([rng], slot_bytes=64, slots=2) as ahead:
        with pytest.raises(CheckpointFormatError, match="a.bin: ends at byte 5000"):
            ahead.next()


def test_a_range_larger_than_a_slot_is_refused(two_files):
    with ReadAhead([FileRange(two_files[0], 0, 100)], slot_bytes=64, slots=2) as ahead:
        with pytest.raises(ValueError, match="does not fit"):
            ahead.next()


def test_closing_early_stops_the_reader(two_files):
    ranges = [FileRange(two_files[1], i, 10) for i in range(1000)]
    ahead = ReadAhead(ranges, slot_bytes=16, slots=2)
    ahead.next()
    ahead.close()
    assert not ahead._thread.is_alive()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel, parts", [(MIN_PARALLEL_ELEMENTS + 77, 3),  # one part a thread
                                          (13 * MIN_PARALLEL_ELEMENTS + 5, 3 * PARTS_PER_THREAD)])
def test_split_operations_give_the_whole_operations_bits(dtype, numel, parts):
    g = torch.Generator().manual_seed(0)
    acc, part = torch.randn(numel, generator=g), torch.randn(numel, generator=g).to(dtype)
    whole = acc.clone().add_(part, alpha=0.3)
    saved = torch.get_num_threads()
    with CpuThreads(3) as threads:
        assert threads.map(lambda a: a.sum(), acc[:100]) and torch.get_num_threads() == saved  # small: no change
        results = threads.map(lambda t, p: t.add_(p, alpha=0.3), acc, part)
        assert torch.get_num_threads() == 1  # no OpenMP team spinning beside the pool
        cast = torch.empty(numel, dtype=dtype)
        threads.map(lambda o, a: o.copy_(a), cast, acc)
    assert len(results) == parts
    assert torch.get_num_threads() == saved
    assert torch.equal(acc.view(torch.int32), whole.view(torch.int32))
    assert torch.equal(cast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32), whole.to(dtype).view(
        torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_unusable_devices_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_page_ahead_hands_over_the_views_in_order_and_stops_early_or_on_error(two_files):
    import mmap

    from ckptmerge.io.page_ahead import PageAhead, make_resident

    with open(two_files[1], "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    whole = torch.frombuffer(mapped, dtype=torch.uint8)
    spans = [(0, 5017), (100, 200), (4096, 921), (5016, 1)]
    with PageAhead(((s, whole[s[0]:s[0] + s[1]]) for s in spans), ahead=2) as pages:
        for span in spans:
            key, view = pages.next()
            assert key == span and view.numpy().tobytes() == expected_bytes(FileRange(two_files[1], *span))
        with pytest.raises(StopIteration):
            pages.next()
    with PageAhead(((i, whole) for i in range(1000)), ahead=2) as pages:  # closed with views still coming
        assert pages.next()[0] == 0

    def failing():
        yield 0, whole
        raise OSError("disk gone")

    with PageAhead(failing(), ahead=2) as pages:
        pages.next()
        with pytest.raises(OSError, match="disk gone"):
            pages.next()
    make_resident(torch.empty(0))  # nothing to map
