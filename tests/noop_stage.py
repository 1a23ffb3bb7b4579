"""A stage whose shard does almost nothing, for measuring and testing the orchestration at scale
(bench/orchestration_scale.py, tests/test_fan_out_scale.py): each shard goes through the same
path as a real one (`run_shard`: cache check, `running` record, a one-row Parquet file and its
manifest record, or the failure recorded) in every fan-out mode, so what is measured is the fan-out.

The shard's reference (the `model_ref` a real sampling shard gets) says how it ends: "ok", or
"fail:3,7" (those shards raise; "fail-once:3" on its first attempt only), "crash:5" (that shard's process exits at once, as a killed
worker would; only where a shard has a process of its own: execution.shards=deployment) and
"crash-once:5" (SIGKILL of the shard's process, a task worker's too, on its first attempt only).
Its shard jobs are the real ones' (tasks/shard_jobs.py): a deployment run holds a slot of
`execution.gpu_concurrency_limit` from its first shard to its last (a task worker's shards hold
none: its `--limit` is its GPUs).
Limit: nothing is computed, so the figures are the orchestration's cost alone, not a stage's.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from m3po.flows.machinery import busy_api
from m3po_core.config import RunConfig
from m3po_core.stages.runner import ShardResult, run_shard
from m3po_core.store import RunStore
from m3po.tasks.shard_jobs import run_shard_group, run_shard_job

busy_api.install()  # as flows/shards.py: a shard's flow-run process retries a busy server soon
STAGE = "noop"
SCHEMA = pa.schema([("shard", pa.int64())])


def _shards(ref: str, kind: str) -> set[int]:
    for part in ref.split(";"):
        if part.startswith(kind + ":"):
            return {int(s) for s in part[len(kind) + 1:].split(",") if s}
    return set()


def noop_shard(cfg: RunConfig, store: RunStore, shard: int, ref: str) -> ShardResult:
    def compute() -> pa.Table:
        if shard in _shards(ref, "crash"):
            os._exit(3)
        if shard in _shards(ref, "crash-once") and not store.exists(f"{STAGE}/crashed-{shard}"):
            store.write_bytes(f"{STAGE}/crashed-{shard}", b"")  # the next attempt computes
            os.kill(os.getpid(), 9)  # as the OOM killer would: no cleanup, the run left Running
        if shard in _shards(ref, "fail"):
            raise ValueError(f"noop shard {shard} told to fail")
        if shard in _shards(ref, "fail-once") and not store.exists(f"{STAGE}/failed-{shard}"):
            store.write_bytes(f"{STAGE}/failed-{shard}", b"")
            raise ValueError(f"noop shard {shard} told to fail once")
        store.write_bytes(f"{STAGE}/computed/{shard}-{os.getpid()}-{time.time_ns()}", b"")  # one per computation
        return pa.table({"shard": [shard]}, schema=SCHEMA)

    return run_shard(store, STAGE, shard, f"noop-{ref}", compute, SCHEMA, lease_seconds=cfg.execution.lease_seconds)


@task(name="noop-shard", task_run_name="noop-shard-{shard:05d}", cache_policy=NO_CACHE)
def noop_task(cfg: RunConfig, store: RunStore, shard: int, model_ref: str) -> ShardResult:
    """execution.shards=in_process: one task run per shard of the flow run."""
    return noop_shard(cfg, store, shard, model_ref)


@task(name="noop-shard-job", task_run_name="noop-{run_id}-{shard}", cache_policy=NO_CACHE)
def noop_shard_job(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str) -> dict[str, Any]:
    """execution.shards=task_worker: a background task run, served by `serve_task_worker`."""
    return run_shard_job(noop_shard, STAGE, config, root, run_id, shard, model_ref)


@flow(name="m3po-noop-shard", flow_run_name="noop-{run_id}-{shard}")
def noop_shard_flow(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str,
                    shards: Optional[list[int]] = None) -> dict[str, Any]:
    """execution.shards=deployment: the entry point of the noop shard deployment (`shards`: a group
    of them, as the real shard flows take)."""
    return run_shard_group(noop_shard, STAGE, config, root, run_id, shards or [shard], model_ref)


def register(deployment: str = "m3po-noop-shard/noop") -> list[str]:
    """Make the stage known to the remote fan-outs; the configuration overrides that point
    `execution.sample_deployment` (the field the stage's deployment is read from) at `deployment`."""
    from m3po.flows.machinery.remote_shards import REMOTE_JOBS

    REMOTE_JOBS[STAGE] = ("sample_deployment", noop_shard_job)
    return [f"execution.sample_deployment={deployment}"]


def serve_task_worker(limit: int = 10) -> None:
    """A long-lived task worker for the noop shards (what `m3po worker` is for real shards)."""
    from m3po.flows.machinery.task_worker import serve_shard_jobs

    serve_shard_jobs(noop_shard_job, limit=limit)


if __name__ == "__main__":
    import sys

    serve_task_worker(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
