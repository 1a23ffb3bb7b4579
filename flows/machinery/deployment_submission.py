"""The deployment fan-out's submission: the shard runs' flow runs, created 100 per call through the
server's bulk endpoint (one call per run on an API without it), each with an idempotency key, and
the placeholder task runs that make them subflows of the stage's flow run (flows/machinery/remote_shards.py).
Limit: placeholders are created one after the other (no bulk endpoint for task runs).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from uuid import UUID

from m3po_core.errors import M3POError

log = logging.getLogger("m3po.flows")
BULK_CREATE = 100   # the server's bound per bulk create (prefect.server.api.deployments.BULK_CREATE_LIMIT)
# sends of a batch the server refused (in part), halved each time, after pauses of 1, 2, 4 .. 60 s
# (~4 min in all: a SQLite server busy with thousands of runs held its lock for over 90 s here)
CREATE_ATTEMPTS = 10
MAX_PAUSE = 60.0
_no_bulk = False     # set once an API answers that it has no bulk endpoint
resent_batches = 0   # batches sent again because the server refused part of them (read by the tests)


def create_flow_runs(client, name: str, params: list[dict[str, Any]], tags: list[list[str]],
                      key: str) -> dict[int, UUID]:
    """The shards' flow runs, BULK_CREATE per call. Each carries an idempotency key (`key` and its
    shard), so a batch the server refused in part (on SQLite a "database is locked" comes back as a
    per-run failure, not as a retried 503) is sent again: the runs it did create come back, not twins."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Scheduled, to_state_create

    global resent_batches
    deployment = client.read_deployment_by_name(name)
    parents = _placeholders(client, name, deployment.version, [p["shard"] for p in params])
    bodies = {p["shard"]: DeploymentFlowRunCreate(parameters=p, state=to_state_create(Scheduled()), tags=t,
                                                  parent_task_run_id=parents.get(p["shard"]),
                                                  idempotency_key=f"{key}-{p['shard']}")
              for p, t in zip(params, tags)}
    ids: dict[int, UUID] = {}
    shards = list(bodies)
    for start in range(0, len(shards), BULK_CREATE):
        todo, size = shards[start:start + BULK_CREATE], BULK_CREATE
        for attempt in range(CREATE_ATTEMPTS):
            refused: dict[int, str] = {}
            for i in range(0, len(todo), size):
                refused.update(_create_batch(client, deployment.id, {s: bodies[s] for s in todo[i:i + size]}, ids))
            if not refused:
                break
            if attempt == CREATE_ATTEMPTS - 1:
                raise M3POError(f"{name}: the API refused {len(refused)} shard runs {CREATE_ATTEMPTS} times: "
                                f"{next(iter(refused.values()))}")
            # a busy SQLite server holds its lock through a whole batch: smaller ones, after a pause
            todo, size = list(refused), max(1, size // 2)
            resent_batches += -(-len(todo) // size)
            pause = min(MAX_PAUSE, 2.0**attempt)
            log.warning("%s: the API refused %d shard run(s) (%s); sending them again in %.0f s", name, len(todo),
                        next(iter(refused.values()))[:120], pause)
            time.sleep(pause)
    return ids


def _create_batch(client, deployment_id: UUID, batch: dict[int, Any], ids: dict[int, UUID]) -> dict[int, str]:
    """Create one batch (into `ids`); the shards the server refused, with its reason."""
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    global _no_bulk
    if not _no_bulk:
        try:
            reply = client.request("POST", "/deployments/{id}/create_flow_run/bulk",  # type: ignore[arg-type]
                                   path_params={"id": deployment_id},
                                   json=[b.model_dump(mode="json", exclude_unset=True) for b in batch.values()])
        except PrefectHTTPStatusError as e:
            if e.response.status_code not in (404, 405):
                raise
            _no_bulk = True  # an API without the bulk endpoint (older servers): one call per run
        else:
            refused = {}
            for shard, result in zip(batch, reply.json()["results"]):
                if result.get("status") == "CREATED":
                    ids[shard] = UUID(result["flow_run_id"])
                else:
                    refused[shard] = result.get("error") or "no reason given"
            return refused
    for shard, b in batch.items():
        ids[shard] = client.create_flow_run_from_deployment(
            deployment_id, parameters=b.parameters, state=Scheduled(), tags=b.tags,
            parent_task_run_id=b.parent_task_run_id, idempotency_key=b.idempotency_key).id
    return {}


def _placeholders(client, name: str, version: str | None, shards: list[int]) -> dict[int, UUID]:
    """The task runs that make the shards' flow runs subflows of this flow run (none outside one)."""
    from prefect import Task
    from prefect.context import FlowRunContext
    from prefect.states import Pending
    from prefect.utilities.slugify import slugify

    ctx = FlowRunContext.get()
    if not (ctx and ctx.flow_run):
        return {}
    placeholder = Task(name=name, fn=lambda: None, version=version)
    placeholder.task_key = f"prefect.deployments.flow_runs.run_deployment.{slugify(name)}"  # as run_deployment keys them
    nonce = uuid.uuid4().hex[:8]  # unique per fan-out, also when a retried flow run fans out again

    return {shard: client.create_task_run(task=placeholder, flow_run_id=ctx.flow_run.id, dynamic_key=f"{nonce}-{shard}",
                                          name=f"{name.split('/')[-1]}-{shard}", state=Pending()).id
            for shard in shards}
