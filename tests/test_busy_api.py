"""The fan-outs' clients retry a busy server soon: a 503 without Retry-After (SQLite's "database is
locked") gets Retry-After BUSY_PAUSE x 8**n (Prefect's patience in all, its first pauses short), and
Prefect's own client, against an HTTP server on loopback that answers 503 twice, waits those pauses
(its log) and gets the answer: with the fan-outs' settings, and in a process after `install()`."""
import subprocess
import sys
import http.server
import json
import logging
import re
import threading

import httpx
import pytest

from m3po.flows.machinery import busy_api


def test_a_busy_answer_gets_a_short_growing_retry_after_and_others_are_left_alone():
    request = httpx.Request("POST", "http://127.0.0.1/api/task_runs/")
    waits = []
    for _ in range(8):
        response = httpx.Response(503, request=request)
        busy_api._mark(response)
        waits.append(float(response.headers["Retry-After"]))
    assert waits == [0.05, 0.4, 3.2, 25.6, 32.0, 32.0, 32.0, 32.0]
    assert sum(waits[:5]) == pytest.approx(61.25)  # Prefect's 2 + 4 + .. + 32 s: the same patience
    ok = httpx.Response(200, request=httpx.Request("GET", "http://127.0.0.1/api/health"))
    busy_api._mark(ok)
    assert "Retry-After" not in ok.headers
    told = httpx.Response(503, headers={"Retry-After": "7"}, request=httpx.Request("GET", "http://127.0.0.1/x"))
    busy_api._mark(told)
    assert told.headers["Retry-After"] == "7"  # the server's own answer stands


@pytest.fixture
def busy_server():
    """Answers GET /api/hello with 503 (no Retry-After) twice, then 200."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            code, body = (503, b'{"exception_message": "Service Unavailable"}') if len(seen) <= 2 else (200, b'{"ok": true}')
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", seen
    server.shutdown()


WAITS = re.compile(r"made in ([0-9.]+)s")


def _check_waits(waits):
    assert len(waits) == 2
    for n, wait in enumerate(waits):  # the pause asked for, plus the client's jitter (at most 20 % more)
        assert busy_api.pause(n) <= wait <= busy_api.pause(n) * 1.21


def test_prefects_client_with_the_hook_waits_the_short_pauses(busy_server):
    from prefect.client.orchestration import SyncPrefectClient

    url, seen = busy_server
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    log = logging.getLogger("prefect.client")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with SyncPrefectClient(url, httpx_settings=busy_api.RETRY_SOON_SYNC) as client:
            reply = client.request("GET", "/hello")  # type: ignore[arg-type]
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert reply.status_code == 200 and json.loads(reply.content) == {"ok": True} and len(seen) == 3
    _check_waits([float(m.group(1)) for r in records if (m := WAITS.search(r.getMessage()))])


INSTALLED = """
import asyncio, logging, sys
from m3po.flows.machinery import busy_api
busy_api.install(); busy_api.install()
from prefect.client.orchestration import PrefectClient
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
logging.getLogger("prefect.client").setLevel(logging.DEBUG)
logging.getLogger("prefect.client").addHandler(logging.StreamHandler(sys.stdout))
async def main():
    async with PrefectClient(sys.argv[1]) as client:   # no settings of ours: the installed hook
        print("status", (await client.request("GET", "/hello")).status_code)
asyncio.run(main())
"""


def test_after_install_every_client_of_the_process_waits_the_short_pauses(busy_server):
    url, seen = busy_server
    out = subprocess.run([sys.executable, "-c", INSTALLED, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "status 200" in out.stdout and len(seen) == 3
    _check_waits(sorted({float(w) for w in WAITS.findall(out.stdout)}))
