"""A shard's GPU slot: one slot of the global concurrency limit `execution.gpu_concurrency_limit`
while the shard computes, when that limit exists on the Prefect server.

Prefect's `concurrency()` on a limit that does not exist acquires nothing, but still sends a write
per shard (an UPDATE that matches no row, then a lease). On the default SQLite server those writes
contend with the fan-out's task-run creation, and either comes back 503 ("database is locked") to
be retried after seconds of back-off: measured on 300 noop task-worker shards, 3.9 s median inside
a shard's run and 0.73 s of submission per shard (bench/orchestration_scale.py). So the limit is
looked up by name first (one read) and, where absent, the shard runs without one. A process keeps
the answer for LOOKUP_SECONDS, so a limit created during a run applies from then on.
A flow run of several shards (`execution.shards_per_run`) holds one slot for all of them
(`RunSlot`): one acquisition, its renewals and one release per run, not per shard.
Limit: with the limit present every run still writes its acquisition and release; many at once on
SQLite contend for its single writer (a GPU pool's server wants PostgreSQL, docs/gpu-work-pool.md).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

LOOKUP_SECONDS = 60.0
_found: dict[tuple[str, str], tuple[float, bool]] = {}  # (api url, limit) -> (when, exists)
_lock = threading.Lock()


def limit_exists(name: str) -> bool:
    """Whether the server has a global concurrency limit `name` (asked at most once a minute)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    key, now = (str(PREFECT_API_URL.value()), name), time.monotonic()
    with _lock:
        seen = _found.get(key)
    if seen is not None and now - seen[0] < LOOKUP_SECONDS:
        return seen[1]
    with get_client(sync_client=True) as client:
        try:
            exists = bool(client.read_global_concurrency_limit_by_name(name).active)
        except ObjectNotFound:
            exists = False
    with _lock:
        _found[key] = (now, exists)
    return exists


@contextlib.contextmanager
def gpu_slot(name: str | None) -> Iterator[bool]:
    """Hold one slot of limit `name` (waiting for it) if the server has that limit; yields whether
    a slot is held."""
    if not name or not limit_exists(name):
        yield False
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1):
        yield True


class RunSlot:
    """The slot of one flow run's shards, which run one after the other on its GPU: `take()` at each
    shard's start (inside that shard's lease, so a wait for the slot still renews a lease) acquires
    it the first time; it is released when the `with` block ends, after the run's last shard.
    `RunSlot(None)` holds nothing."""

    def __init__(self, name: str | None):
        self.name = name
        self.held: bool | None = None  # None: not asked yet
        self._stack = contextlib.ExitStack()

    def take(self) -> bool:
        if self.held is None:
            self.held = self._stack.enter_context(gpu_slot(self.name))
        return self.held

    def __enter__(self) -> "RunSlot":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
