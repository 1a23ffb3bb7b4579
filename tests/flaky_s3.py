"""An HTTP proxy in front of the loopback S3 server that fails requests on demand: S3's own
`503 SlowDown` reply, or a connection dropped without a reply. What s3fs meets on a bad day. It can
also hold each request `delay` seconds (an object store's round trip, which loopback lacks) and
counts the requests in flight at once (`max_in_flight`)."""
from __future__ import annotations

import http.server
import socket
import threading
import time

import httpx

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyS3Proxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.plan: list[tuple[str | None, str]] = []   # (method or None for any, "503" | "drop")
        self.injected = 0
        self.outage = False
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        # one pooled client for every relayed request: a client per request (httpx.request) builds an
        # SSL context and a connection each time, ~0.2 s of CPU under load, which drowned the `delay`
        self.client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._relay()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.delay:
                    time.sleep(proxy.delay)
                fault = proxy._fault(self.command)
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    body = b"" if self.command == "HEAD" else SLOW_DOWN  # HEAD replies carry no body
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = proxy.client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                data = b"" if self.command == "HEAD" else r.content
                self.send_header("Content-Length", str(len(r.content) if self.command != "HEAD" else
                                                       r.headers.get("content-length", 0)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, n: int, kind: str = "503", method: str | None = None) -> None:
        with self.lock:
            self.plan.extend([(method, kind)] * n)

    def _fault(self, method: str) -> str | None:
        with self.lock:
            if self.outage:
                self.injected += 1
                return "503"
            for i, (m, kind) in enumerate(self.plan):
                if m is None or m == method:
                    del self.plan[i]
                    self.injected += 1
                    return kind
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.client.close()


def start_moto(bucket: str, port: int) -> tuple["subprocess.Popen", str]:
    """moto's S3 server in a process of its own on loopback, with `bucket`; the AWS_* variables
    point botocore (and so s3fs) at it. (process, endpoint URL); stop it with prefect_loopback.stop."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import boto3

    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
    for attempt in range(120):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            return proc, endpoint
        except Exception:  # noqa: BLE001 (not up yet)
            if attempt == 119:
                proc.kill()
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")
