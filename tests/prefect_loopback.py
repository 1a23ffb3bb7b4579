"""Real Prefect machinery on loopback for the orchestration tests and bench/orchestration_scale.py:
a server (`prefect server start`, with its access log), a process work pool and its worker, the noop
shard deployment (tests/noop_stage.py), a task worker for the noop shards, and a count of the HTTP
requests this process's Prefect clients send. Nothing is mocked: the counter only records requests.
Limit: one machine; the workers inherit this process's environment (AWS_* for an s3:// root).
"""
from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "m3po-noop"
DEPLOYMENT = "m3po-noop-shard/noop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no Prefect server at {url} after {timeout:.0f}s")


def start_server(home: Path, log: Path, database_url: str | None = None) -> tuple[subprocess.Popen, str]:
    """A fresh server on a free port, its access log in `log`; its database: SQLite under `home`,
    or `database_url` (e.g. postgresql+asyncpg://user@127.0.0.1:5432/prefect, an empty database)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_LOGGING_LEVEL": "INFO",  # uvicorn's access log: one line per request
           "PREFECT_UI_ENABLED": "false"}
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_healthy(url, proc)
    return proc, url


ACCESS = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) /api(/[^ ?"]*)')


def access_counts(log: Path, since_line: int = 0) -> tuple[collections.Counter, int]:
    """Requests in the server's access log after line `since_line`, by "METHOD /route" (ids cut
    to `{id}`), and the log's line count now."""
    lines = log.read_text(errors="replace").splitlines()
    counts: collections.Counter = collections.Counter()
    for line in lines[since_line:]:
        if m := ACCESS.search(line):
            counts[f"{m.group(1)} {_route(m.group(2))}"] += 1
    return counts, len(lines)


def _route(path: str) -> str:
    return re.sub(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "/{id}", path)


def worker_env(url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def deploy_noop(url: str, gpu_slots: int = 1000) -> None:
    """The process pool, the noop shard deployment on it, and the global concurrency limit the
    shards hold (as many slots as the workers can run: it never blocks here)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from noop_stage import noop_shard_flow
    from m3po_core.config import ExecutionConfig

    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            try:
                client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            except ObjectAlreadyExists:
                pass
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=ExecutionConfig.gpu_concurrency_limit, limit=gpu_slots))
            except ObjectAlreadyExists:
                pass
        noop_shard_flow.from_source(str(REPO), "tests/noop_stage.py:noop_shard_flow").deploy(
            name=DEPLOYMENT.split("/")[1], work_pool_name=POOL, build=False, push=False, print_next_steps=False)


def start_process_worker(env: dict[str, str], log: Path, limit: int) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                             "--limit", str(limit)], env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start_task_worker(env: dict[str, str], log: Path, limit: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "noop_stage.py"), str(limit)], env=env, cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still shutting down (a worker may wait on its runs)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


class RequestCounter:
    """Every HTTP request this process's Prefect clients send while active: `requests` holds
    (time, "METHOD /route") pairs, `retries` the resends of a request Prefect's client retried
    (a 503 from a busy SQLite database, say). Counting only: each request goes out unchanged."""

    def __init__(self):
        self.requests: list[tuple[float, str]] = []
        self.retries: list[tuple[float, str]] = []
        self._seen: weakref.WeakSet = weakref.WeakSet()  # requests sent once already (ids would be reused)
        self._lock = threading.Lock()

    def _note(self, request) -> None:
        route = f"{request.method} {_route(request.url.path.split('/api', 1)[-1])}"
        with self._lock:
            (self.retries if request in self._seen else self.requests).append((time.time(), route))
            self._seen.add(request)

    def by_route(self, since: float = 0.0, until: float = float("inf"), retries: bool = False) -> collections.Counter:
        """Requests (and, with `retries`, their resends too) sent in [since, until), by route."""
        with self._lock:
            sent = self.requests + (self.retries if retries else [])
            return collections.Counter(r for t, r in sent if since <= t < until)

    @contextmanager
    def counting(self):
        """Count at the wire: each attempt of Prefect's retrying send (a retried request counts twice)."""
        from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

        sync_swr, async_swr = PrefectHttpxSyncClient._send_with_retry, PrefectHttpxAsyncClient._send_with_retry
        counter = self

        def swr(self, *args, **kwargs):
            send = kwargs["send"]

            def counted(request, *a, **k):
                counter._note(request)
                return send(request, *a, **k)

            return sync_swr(self, *args, **{**kwargs, "send": counted})

        async def aswr(self, *args, **kwargs):
            send = kwargs["send"]

            async def counted(request, *a, **k):
                counter._note(request)
                return await send(request, *a, **k)

            return await async_swr(self, *args, **{**kwargs, "send": counted})

        PrefectHttpxSyncClient._send_with_retry, PrefectHttpxAsyncClient._send_with_retry = swr, aswr
        try:
            yield self
        finally:
            PrefectHttpxSyncClient._send_with_retry, PrefectHttpxAsyncClient._send_with_retry = sync_swr, async_swr
