"""Per-shard flows: what a GPU worker runs when shards fan out as deployments.

Each run holds one slot of the global concurrency limit `execution.gpu_concurrency_limit` from its
first shard to its last (create it with as many slots as GPUs: `prefect gcl create m3po-gpu --limit 8`;
absent, no slot is asked for, flows/machinery/gpu_slot.py).
A flow run is a process of its own, so it loads its model: with `shards` (the fan-out passes
`execution.shards_per_run` of them) it computes them one after the other on the model it loaded;
to keep models loaded across runs, use `execution.shards: task_worker` and `m3po worker` instead
(docs/gpu-work-pool.md).
"""
from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from m3po.flows.machinery import busy_api
from m3po_core.stages import sample, score
from m3po.tasks.shard_jobs import run_shard_group

# this module is what a shard's flow-run process loads before its engine talks to the API: from here
# on its Prefect clients retry a busy (SQLite) server's 503s soon (flows/machinery/busy_api.py)
busy_api.install()


@flow(name="m3po-sample-shard", flow_run_name="sample-{run_id}-{shard}")
def sample_shard(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str,
                 shards: Optional[list[int]] = None) -> dict[str, Any]:
    """Shard `shard`, or every shard of `shards` (then `shard` is the first, for the run's name)."""
    return run_shard_group(sample.sample_shard, "candidates", config, root, run_id, shards or [shard], model_ref)


@flow(name="m3po-score-shard", flow_run_name="score-{run_id}-{shard}")
def score_shard(config: dict[str, Any], root: str, run_id: str, shard: int, clip_ref: str,
                shards: Optional[list[int]] = None) -> dict[str, Any]:
    return run_shard_group(score.score_shard, "scores", config, root, run_id, shards or [shard], clip_ref)
