"""Clients that retry a busy server soon: the default SQLite Prefect server answers a write that
meets another writer's lock with 503 and no Retry-After ("database is locked", usually gone within
milliseconds), and Prefect's client then waits 2**n s (n: the attempt; 2, 4, .. 32 s, 62 s in all).
A response hook gives such an answer a Retry-After of BUSY_PAUSE x 8**n s, at most BUSY_PAUSE_MAX
(0.05, 0.4, 3.2, 25.6, 32 s: 61 s in all, so a server that stays busy gets the same patience);
Prefect's client honours it, with its jitter, up to PREFECT_CLIENT_MAX_RETRIES.

The fan-outs' own clients carry the hook (`RETRY_SOON`, `RETRY_SOON_SYNC`: task-run submission,
flow-run creation, state polls), and `install()` gives it to every Prefect client a process creates
afterwards: the shard processes (task workers, deployment shard runs) install it, so their
engines' slot requests and state reports retry soon too. Measured on 300 noop task-worker shards
(bench/orchestration_scale.py): ~300 such answers; the submission 1.24 -> 0.18 s per shard.
Limit: a 503 that carries its own Retry-After (or any other status) is left as the server said.
"""
from __future__ import annotations

BUSY_PAUSE, BUSY_PAUSE_MAX, GROWTH = 0.05, 32.0, 8


def pause(n: int) -> float:
    """Seconds to wait after a request's n-th busy answer (n from 0)."""
    return min(BUSY_PAUSE_MAX, BUSY_PAUSE * GROWTH ** n)


def _mark(response) -> None:
    if response.status_code in (429, 503) and "Retry-After" not in response.headers:
        n = response.request.extensions.get("m3po_busy", 0)
        response.request.extensions["m3po_busy"] = n + 1
        response.headers["Retry-After"] = f"{pause(n):.3f}"


async def _mark_async(response) -> None:
    _mark(response)


RETRY_SOON = {"event_hooks": {"response": [_mark_async]}}      # get_client(httpx_settings=...)
RETRY_SOON_SYNC = {"event_hooks": {"response": [_mark]}}       # get_client(sync_client=True, ...)


def install() -> None:
    """Every Prefect API client this process creates from now on carries the hook (idempotent)."""
    from prefect.client import base

    for cls, hook in ((base.PrefectHttpxAsyncClient, _mark_async), (base.PrefectHttpxSyncClient, _mark)):
        if getattr(cls, "_m3po_retry_soon", False):
            continue
        init = cls.__init__

        def with_hook(self, *args, _init=init, _hook=hook, **kwargs):
            hooks = dict(kwargs.pop("event_hooks", None) or {})
            response = list(hooks.get("response", []))
            hooks["response"] = response + ([_hook] if _hook not in response else [])
            _init(self, *args, event_hooks=hooks, **kwargs)

        cls.__init__ = with_hook
        cls._m3po_retry_soon = True
