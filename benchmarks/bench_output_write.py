"""How to fill a merge's output file: the ways of writing N bytes into a new file, side by side.

Each variant writes the same 16 MB chunks into a fresh file and fsyncs it, in alternating rounds:
- ``pwrite``: plain writes into a file that grows (what the engine did before issue 18);
- ``fallocate + pwrite``: the file's blocks reserved first;
- ``fallocate + pwrite x2``: the same from two threads (the engine's workers): they queue on the
  file's inode lock;
- ``fallocate + map per write``: each chunk stored through a shared map of its own range, made and
  dropped per chunk (what ``io/output_file.py`` does on ext4 and XFS);
- ``fallocate + map per write x2``: the same from two threads;
- ``fallocate + one map``: one shared map of the whole file, pages mapped with ``MADV_POPULATE_WRITE``
  (tried and dropped).

It prints the median seconds to write (before the fsync), seconds in all and CPU seconds per variant.

    .venv/bin/python benchmarks/bench_output_write.py --mb 512 --rounds 5              # memory freed 3 s before
    .venv/bin/python benchmarks/bench_output_write.py --mb 512 --rounds 5 --settle 0   # freed just before
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

WORK = Path(__file__).resolve().parent / "_work"
CHUNK_BYTES = 16 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_MADV_POPULATE_WRITE = 23


def write_file(path: Path, nbytes: int, chunk: torch.Tensor, *, reserve: bool, mapped: str, threads: int,
               settle_s: float) -> dict:
    if path.exists():
        path.unlink()
    time.sleep(settle_s)  # as bench_merge.py: memory freed seconds ago, not just now (costlier on this VM)
    t0, c0 = time.monotonic(), os.times()
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    if reserve and _libc.fallocate(fd, 0, 0, nbytes) != 0:
        raise SystemExit(f"fallocate failed: {os.strerror(ctypes.get_errno())}")
    offsets = range(0, nbytes, CHUNK_BYTES)
    region = None
    if mapped == "whole":
        region = mmap.mmap(fd, nbytes)
        data = torch.frombuffer(region, dtype=torch.uint8)

        def put(offset: int) -> None:
            dst = data[offset:offset + CHUNK_BYTES]
            if _libc.madvise(dst.data_ptr(), dst.numel(), _MADV_POPULATE_WRITE) != 0:
                raise SystemExit(f"madvise failed: {os.strerror(ctypes.get_errno())}")
            dst.copy_(chunk[:dst.numel()])
    elif mapped == "per write":
        def put(offset: int) -> None:
            n = min(CHUNK_BYTES, nbytes - offset)
            with mmap.mmap(fd, n, offset=offset) as piece:
                dst = np.frombuffer(piece, dtype=np.uint8)
                torch.from_numpy(dst).copy_(chunk[:n])
                del dst
    else:
        raw = chunk.numpy()

        def put(offset: int) -> None:
            os.pwrite(fd, raw[:min(CHUNK_BYTES, nbytes - offset)], offset)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, offsets))
    written = time.monotonic()
    if region is not None:
        del data, put
        region.close()
    os.fsync(fd)
    os.close(fd)
    t1, c1 = time.monotonic(), os.times()
    return {"write_s": written - t0, "total_s": t1 - t0, "cpu_s": c1.user + c1.system - c0.user - c0.system}


VARIANTS = {"pwrite": dict(reserve=False, mapped="", threads=1),
            "fallocate + pwrite": dict(reserve=True, mapped="", threads=1),
            "fallocate + pwrite x2": dict(reserve=True, mapped="", threads=2),
            "fallocate + map per write": dict(reserve=True, mapped="per write", threads=1),
            "fallocate + map per write x2": dict(reserve=True, mapped="per write", threads=2),
            "fallocate + one map": dict(reserve=True, mapped="whole", threads=1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=512, help="file size in MiB (a multiple of 16)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--settle", type=float, default=3.0, help="seconds between deleting the old file and writing")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    path, nbytes = args.work / "output-write.bin", args.mb << 20
    chunk = torch.randn(CHUNK_BYTES // 4, generator=torch.Generator().manual_seed(0)).view(torch.uint8)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, how in VARIANTS.items():
            results[name].append(write_file(path, nbytes, chunk, settle_s=args.settle, **how))
    path.unlink()
    print(f"{args.mb} MiB in 16 MiB chunks, {args.rounds} rounds, settle {args.settle:g} s, "
          f"medians (range of the write seconds)\n")
    print("| variant | write s | write + fsync s | CPU s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        writes = [r["write_s"] for r in runs]
        print(f"| {name} | {statistics.median(writes):.3f} ({min(writes):.3f}-{max(writes):.3f}) | "
              f"{statistics.median(r['total_s'] for r in runs):.3f} | {statistics.median(r['cpu_s'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
