"""A task worker that serves shard jobs (`m3po worker`, and the noop stage's for tests and benches).

Prefect 3.7's client services (the events worker, the concurrency-slot lease service) are created
under one class-wide lock, and one created off the global event loop waits for that loop while
holding the lock. A task worker runs on the global loop and emits an event for every run it
submits; a task run's engine creating a lease service at that moment deadlocks the worker for good
(seen here: the worker's first shard hung in `aacquire_concurrency_slots_with_lease`). So the
lease service of the limit the shard jobs take (`execution.gpu_concurrency_limit`) is created
before serving, and the fan-out gives task runs no tags (a tag is a concurrency limit name to the
task engine: a new set of tags, a new service).
Limit: a job whose configuration names another limit creates its service on its first shard.
"""
from __future__ import annotations

from m3po_core.config import ExecutionConfig


def warm_lease_service(*limit_names: str) -> None:
    """Create the lease service for `limit_names` now (from this, the main, thread)."""
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    ConcurrencySlotAcquisitionWithLeaseService.instance(frozenset(limit_names))


def serve_shard_jobs(*jobs, limit: int, limit_name: str = ExecutionConfig.gpu_concurrency_limit) -> None:
    """`prefect.task_worker.serve(*jobs, limit=limit)`, once the jobs' lease service exists."""
    from prefect.task_worker import serve

    from m3po.flows import busy_api

    busy_api.install()  # before any client exists: the engines' slot requests retry a busy server soon
    warm_lease_service(limit_name)
    serve(*jobs, limit=limit)
