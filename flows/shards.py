"""Per-shard flows: what a GPU worker runs when shards fan out as deployments.

Each holds one slot of the global concurrency limit `execution.gpu_concurrency_limit` (create it
with as many slots as GPUs: `prefect gcl create m3po-gpu --limit 8`; absent, it does not block).
A flow run is a process of its own, so it loads its model; to keep models loaded across shards,
use `execution.shards: task_worker` and `m3po worker` instead (docs/gpu-work-pool.md).
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from m3po_core.stages import sample, score
from m3po.tasks.stage_tasks import run_shard_job


@flow(name="m3po-sample-shard", flow_run_name="sample-{run_id}-{shard}")
def sample_shard(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str) -> dict[str, Any]:
    return run_shard_job(sample.sample_shard, "candidates", config, root, run_id, shard, model_ref)


@flow(name="m3po-score-shard", flow_run_name="score-{run_id}-{shard}")
def score_shard(config: dict[str, Any], root: str, run_id: str, shard: int, clip_ref: str) -> dict[str, Any]:
    return run_shard_job(score.score_shard, "scores", config, root, run_id, shard, clip_ref)
