"""A real S3 API server for the tests: moto's standalone server (``pip install 'moto[server]'``, the ``test``
extra) on a free local port, started once per test module, as s3fs's own test-suite does it.

``s3_endpoint`` yields the endpoint URL and sets ``CKPTMERGE_STORAGE_OPTIONS`` (endpoint, key, secret) for the
test; where moto or s3fs is missing or the server cannot start, it skips with the reason.
"""

from __future__ import annotations

import json
import os

import pytest

KEY, SECRET = "ckptmerge-test-key", "ckptmerge-test-SECRET-value"


@pytest.fixture(scope="module")
def s3_server():
    """``http://127.0.0.1:PORT`` of a running moto S3 server (stopped after the module)."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"no S3 test server: {exc.name} is not installed (pip install 'ckptmerge[test]')")
    try:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a skip with its reason
        pytest.skip(f"the moto S3 server could not start: {type(exc).__name__}: {exc}")
    yield f"http://{host}:{port}"
    server.stop()


def storage_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An s3fs filesystem on the test server; the library sees the same server through the environment."""
    import s3fs

    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(storage_options(s3_server)))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    fs = s3fs.S3FileSystem(**storage_options(s3_server), skip_instance_cache=True)
    return fs


def upload(fs, local, url_path: str) -> None:
    """Copy a local folder tree to ``bucket/prefix`` (the bucket is created when missing)."""
    bucket = url_path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(file), f"{url_path}/{file.relative_to(local).as_posix()}")
    os.sync()


def replace_on_first_read(monkeypatch, reader_cls, fs, local, url_path: str) -> list:
    """Make the first tensor read of any ``reader_cls`` first replace the object ``url_path`` with the local file
    ``local``: the object changes after the merge listed and pinned it. Returns the list that records the
    replacement (clear it to arm the trap again)."""
    original, replaced = reader_cls.get_rows, []

    def replace_once(self, name, start, stop):
        if not replaced:  # the merge has planned and starts reading tensor data
            replaced.append(1)
            fs.put_file(str(local), url_path)
        return original(self, name, start, stop)

    monkeypatch.setattr(reader_cls, "get_rows", replace_once)
    return replaced


class FaultProxy:
    """An HTTP proxy in front of the S3 server that misbehaves on request: ``deny`` (a predicate on method and
    path) answers 403 AccessDenied, ``fail_every`` answers every k-th request with a 500 (or drops the
    connection when ``drop``), ``delay_puts`` sleeps before forwarding each PUT. ``requests`` logs what passed.

    It can also shape traffic like a distant store (off by default; ``benchmarks/bench_remote.py`` turns it on):
    ``latency`` seconds are added before the first byte of every answer (on top of the server's own time), and
    ``bandwidth`` bytes per second caps each answer's body, i.e. each connection while it sends one."""

    def __init__(self, upstream: str, *, latency: float = 0.0, bandwidth: float = 0.0, log: str | None = None):
        import http.server
        import threading

        self.upstream = upstream.removeprefix("http://")
        self.deny = lambda method, path: False
        self.fail_every, self.drop, self.delay_puts = 0, False, 0.0
        self.latency, self.bandwidth = latency, bandwidth
        self._log = open(log, "a", buffering=1) if log else None  # one line per answer: start, end, method, path, range
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self._count, self._lock = 0, threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                proxy._forward(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _forward(self, handler) -> None:
        import http.client
        import time

        started = time.time()
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            self._count += 1
            failing = self.fail_every and self._count % self.fail_every == 0
            self.requests.append((handler.command, handler.path, handler.headers.get("Range", "")))
        if failing and self.drop:
            handler.close_connection = True
            handler.connection.close()
            return
        if failing or self.deny(handler.command, handler.path):
            code, text = (500, "InternalError") if failing else (403, "AccessDenied")
            payload = f"<Error><Code>{text}</Code><Message>{text}</Message></Error>".encode()
            handler.send_response(code)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload if handler.command != "HEAD" else b"")
            return
        if handler.command == "PUT" and self.delay_puts:
            time.sleep(self.delay_puts)
            if _client_gone(handler):  # a killed client's request is dropped, as a server aborts a reset upload
                return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(handler.command, handler.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if self.latency:
            time.sleep(self.latency)
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                handler.send_header(key, value)
        length = response.getheader("Content-Length") if handler.command == "HEAD" else None
        handler.send_header("Content-Length", length or str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            try:
                self._send_body(handler, data)
            except (BrokenPipeError, ConnectionResetError):  # the client dropped the answer (s3fs' get drops a
                handler.close_connection = True                 # whole-object GET to fetch parts side by side)
        conn.close()
        if self._log:
            self._log.write(f"{started:.6f} {time.time():.6f} {handler.command} {handler.path.split('?')[0]} "
                            f"{handler.headers.get('Range', '-').replace(' ', '')}\n")

    def _send_body(self, handler, data: bytes) -> None:
        """Write ``data``, no faster than ``bandwidth`` bytes per second when it is set."""
        import time

        if not self.bandwidth:
            handler.wfile.write(data)
            return
        view, step, started = memoryview(data), 256 << 10, time.perf_counter()
        for begin in range(0, len(view), step):
            handler.wfile.write(view[begin:begin + step])
            early = (begin + len(view[begin:begin + step])) / self.bandwidth - (time.perf_counter() - started)
            if early > 0:
                time.sleep(early)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._log:
            self._log.close()


@pytest.fixture
def proxy(s3_server, s3, monkeypatch):
    """A FaultProxy in front of the server; the library talks to it (the test's ``s3`` talks to the server)."""
    p = FaultProxy(s3_server)
    options = {**storage_options(p.endpoint), "config_kwargs": {"retries": {"max_attempts": 1}}}
    monkeypatch.setenv("CKPTMERGE_STORAGE_OPTIONS", json.dumps(options))
    yield p
    p.stop()


def _client_gone(handler) -> bool:
    """True when the client closed its connection (a killed process): its socket reads end-of-file."""
    import select
    import socket

    readable, _, _ = select.select([handler.connection], [], [], 0)
    if not readable:
        return False
    try:
        return handler.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def main(argv: list[str] | None = None) -> None:
    """``python tests/s3_server.py UPSTREAM [--latency S] [--bandwidth B]``: a FaultProxy in a process of its own
    (so its work does not share the measured process's interpreter); prints its endpoint, serves until stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added before each answer's first byte")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes per second per answer (0: no cap)")
    parser.add_argument("--log", help="append a line per answer: start and end (epoch seconds), method, path, range")
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, latency=args.latency, bandwidth=args.bandwidth, log=args.log)
    print(proxy.endpoint, flush=True)
    sys.stdin.read()
    proxy.stop()


if __name__ == "__main__":
    main()
