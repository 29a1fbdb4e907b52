"""Streamed merge from an S3 API server vs download-then-merge, side by side on one local server (moto).

- streamed: ``ckptmerge merge s3://bench/run --last N -o OUT`` (headers by range, rows fetched ahead,
  ``--io-concurrency`` requests in flight per checkpoint; no local copy of the inputs).
- download-then-merge: fsspec ``get`` of the N checkpoint folders to a local folder, then the local merge.
Reported: median seconds of each (runs alternate, ABBA), their ratio, bytes requested / input bytes and range
requests per checkpoint (counted in the reader), and peak RSS of a streamed merge of 2 and of N checkpoints
(each in a fresh process), which should not grow with N.

The server runs on this machine, so there is no network latency to hide: the numbers measure the overhead of
reading by ranges, not the gain over a real link, where every request waits a round trip.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_remote.py --mb 32 --n 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

BUCKET = "bench"


def write_run(root: Path, n: int, megabytes: int) -> None:
    """``n`` HF folders of bf16 tensors (rows of 4096) adding up to ``megabytes`` each."""
    rows = megabytes * (1 << 20) // (4096 * 2) // 8
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {f"layers.{k}.weight": torch.randn(rows, 4096, generator=g).to(torch.bfloat16) for k in range(8)}
        folder = root / f"checkpoint-{100 * (i + 1)}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text("{}")


def count_requests():
    """Wrap the remote reader's one request method; returns the list it appends (url, offset, bytes) to."""
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    asked, original = [], RemoteSafetensorsReader._range

    def counted(self, obj, offset, nbytes):
        asked.append((str(obj.url), offset, nbytes))
        return original(self, obj, offset, nbytes)

    RemoteSafetensorsReader._range = counted
    return asked


def streamed(n: int, out: Path) -> float:
    from ckptmerge.cli.main import main

    started = time.perf_counter()
    assert main(["merge", f"s3://{BUCKET}/run", "--last", str(n), "-o", str(out), "--quiet", "--force"]) == 0
    return time.perf_counter() - started


def download_then_merge(fs, n: int, out: Path, scratch: Path) -> float:
    from ckptmerge.cli.main import main

    started = time.perf_counter()
    names = sorted(fs.ls(f"{BUCKET}/run"), key=lambda k: int(k.rsplit("-", 1)[1]))[-n:]
    local = scratch / "downloaded"
    shutil.rmtree(local, ignore_errors=True)
    for name in names:
        fs.get(name + "/", str(local / name.rsplit("/", 1)[1]) + "/", recursive=True)
    assert main(["merge", str(local), "--last", str(n), "-o", str(out), "--quiet", "--force"]) == 0
    return time.perf_counter() - started


def peak_rss_mb(n: int, out: Path) -> float:
    """Peak RSS of a streamed merge of ``n`` checkpoints in a fresh process."""
    code = ("import resource, sys; from ckptmerge.cli.main import main; "
            f"assert main(['merge', 's3://{BUCKET}/run', '--last', '{n}', '-o', {str(out)!r}, '--quiet', '--force']) == 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="MB per checkpoint")
    parser.add_argument("--n", type=int, default=4, help="checkpoints merged")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA pairs")
    args = parser.parse_args()
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    os.environ.update(CKPTMERGE_STORAGE_OPTIONS=json.dumps(options), AWS_DEFAULT_REGION="us-east-1")
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        write_run(scratch / "run", args.n, args.mb)
        fs.mkdir(BUCKET)
        fs.put(str(scratch / "run") + "/", f"{BUCKET}/run/", recursive=True)
        input_bytes = sum(p.stat().st_size for p in (scratch / "run").rglob("*.safetensors"))
        asked = count_requests()
        streamed(args.n, scratch / "warm")  # first run: counts requests, warms the server
        requested, requests = sum(b for _, _, b in asked), len(asked)
        times = {"streamed": [], "download": []}
        for i in range(args.repeats):
            order = ("streamed", "download") if i % 2 == 0 else ("download", "streamed")
            for name in order + order[::-1]:
                out = scratch / f"out-{name}"
                t = streamed(args.n, out) if name == "streamed" else download_then_merge(fs, args.n, out, scratch)
                times[name].append(t)
        rss = {n: peak_rss_mb(n, scratch / f"rss-{n}") for n in sorted({2, args.n})}
    server.stop()
    s, d = statistics.median(times["streamed"]), statistics.median(times["download"])
    print(f"N={args.n} checkpoints of {args.mb} MB (bf16), local moto server, {torch.get_num_threads()} torch threads")
    print(f"streamed merge          {s:7.2f} s (median of {len(times['streamed'])})")
    print(f"download, then merge    {d:7.2f} s (median of {len(times['download'])})")
    print(f"streamed / download     {s / d:7.2f}x")
    print(f"bytes requested / input {requested / input_bytes:7.4f} ({requested:,} of {input_bytes:,})")
    print(f"requests per checkpoint {requests / args.n:7.1f}")
    print("peak RSS (fresh process) " + ", ".join(f"N={n}: {mb:.0f} MB" for n, mb in rss.items()))


if __name__ == "__main__":
    main()
