"""Background task runs for the task-worker fan-out: what `Task.delay` does per shard, over one
client (one POST each; the parameters go to the task-scheduling storage). `delay` itself opens a
client, a connection and a CSRF-token request per call.

`Task.create_run(deferred=True)` also serializes the whole run context for each run (Prefect's
settings model included): measured here, 83 % of a shard's submission (about 0.17 s of CPU of
0.2 s). The runs of one fan-out are created in one context (the same flow run, no tags, the same
settings), so `delay_all` serializes it once and hands every run that copy (`_ONE_CONTEXT`).
Limit: the cache is keyed by the identity of the context objects and lives for one `delay_all`.

The submission's client retries a busy server's 503 soon (flows/machinery/busy_api.py).
"""
from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any
from uuid import UUID

import prefect.tasks
from prefect import get_run_logger

CREATE_ATTEMPTS = 8  # sends of a batch the server refused (in part), halved each time, ~90 s of pauses

_ONE_CONTEXT: ContextVar[dict | None] = ContextVar("m3po_one_context", default=None)
_serialize_context = prefect.tasks.serialize_context


def _context_key() -> tuple:
    from prefect.context import EngineContext, SettingsContext, TagsContext, TaskRunContext

    return (id(EngineContext.get()), id(TaskRunContext.get()), frozenset(TagsContext.get().current_tags),
            id(SettingsContext.get()))


def _serialized_once(asset_ctx_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    cache = _ONE_CONTEXT.get()
    if cache is None or asset_ctx_kwargs:  # outside delay_all, or a context of its own: Prefect's
        return _serialize_context(asset_ctx_kwargs)
    key = _context_key()
    if key not in cache:
        cache[key] = _serialize_context()
    return cache[key]


prefect.tasks.serialize_context = _serialized_once  # transparent outside delay_all


async def delay_all(job, params: list[dict[str, Any]], tags: list[list[str]],
                    context_once: bool = True) -> dict[int, UUID]:
    """`job.delay(**p)` for each shard's parameters `p` with exactly its `tags`: shard -> task run id.
    `context_once=False`: Prefect serializes the context for every run (bench/task_submission.py)."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.engine import emit_task_run_state_change_event

    from m3po.flows.machinery.busy_api import RETRY_SOON

    ids = {}
    token = _ONE_CONTEXT.set({} if context_once else None)
    try:
        async with get_client(httpx_settings=RETRY_SOON) as client:
            for p, t in zip(params, tags):
                run = await busy_retried(lambda: _create_task_run(job, client, p, t), f"shard {p['shard']}'s task run")
                emit_task_run_state_change_event(task_run=run, initial_state=None, validated_state=run.state)
                ids[p["shard"]] = run.id
    finally:
        _ONE_CONTEXT.reset(token)
    return ids


async def _create_task_run(job, client, params: dict[str, Any], tags: list[str]):
    from prefect.context import TagsContext

    # exactly `tags` (none, see flows/machinery/task_worker.py), not also the tags around the flow (`run:...`)
    with TagsContext(current_tags=set(tags)):
        return await job.create_run(client=client, parameters=params, deferred=True)


async def busy_retried(make, what: str):
    """`make()` again while the server answers 503/429 past the client's own retries (the default
    SQLite server under load: "database is locked"), with backoff; then its error."""
    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            return await make()
        except PrefectHTTPStatusError as e:
            if e.response.status_code not in (429, 503) or attempt == CREATE_ATTEMPTS - 1:
                raise
            get_run_logger().warning(f"{what}: the API is busy ({e.response.status_code}); trying again")
            await asyncio.sleep(min(30.0, 2.0 * 2**attempt))
