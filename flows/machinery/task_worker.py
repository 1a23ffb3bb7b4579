"""A task worker that serves shard jobs (`m3po worker`, and the noop stage's for tests and benches).

A task worker serves the GPUs it was started on (`--limit` shards at once), so its shards take no
slot of the pool-wide limit `execution.gpu_concurrency_limit` (deployment shard runs do): measured
on 3,000 noop shards, each slot's acquisition, lease renewal and release were writes that contended
with the submission on the default SQLite server, and shards ran at ~2 s each instead of ~0.2 s.
That also keeps a Prefect 3.7 hazard away: its client services (the events worker, the concurrency-
slot lease service) are created under one class-wide lock, and one created off the global event
loop waits for that loop while holding the lock; a task worker runs on the global loop, so a task
run creating a lease service while the worker emits an event deadlocked it for good (seen here:
the first shard hung in `aacquire_concurrency_slots_with_lease`). For the same reason the fan-out
gives task runs no tags (a tag is a concurrency limit name to the task engine).
Limit: shards of the two modes on the same GPUs at once are not bounded together.
"""
from __future__ import annotations


def serve_shard_jobs(*jobs, limit: int) -> None:
    """`prefect.task_worker.serve(*jobs, limit=limit)`, its Prefect clients retrying a busy server soon."""
    from prefect.task_worker import serve

    from m3po.flows.machinery import busy_api

    busy_api.install()  # before any client exists (flows/machinery/busy_api.py)
    serve(*jobs, limit=limit)
