"""Per-shard flows: what a GPU worker runs when shards fan out as deployments.

Each holds one slot of the global concurrency limit `execution.gpu_concurrency_limit` (create it
with as many slots as GPUs: `prefect gcl create m3po-gpu --limit 8`; absent, it does not block).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow
from prefect.concurrency.sync import concurrency

from m3po_core import stages
from m3po_core.config import config_from_dict
from m3po_core.store import RunStore


@flow(name="m3po-sample-shard", flow_run_name="sample-{run_id}-{shard}")
def sample_shard(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str) -> dict[str, Any]:
    cfg = config_from_dict(config)
    with concurrency(cfg.execution.gpu_concurrency_limit, occupy=1):
        return dataclasses.asdict(stages.sample_shard(cfg, RunStore(root, run_id), shard, model_ref))


@flow(name="m3po-score-shard", flow_run_name="score-{run_id}-{shard}")
def score_shard(config: dict[str, Any], root: str, run_id: str, shard: int, clip_ref: str) -> dict[str, Any]:
    cfg = config_from_dict(config)
    with concurrency(cfg.execution.gpu_concurrency_limit, occupy=1):
        return dataclasses.asdict(stages.score_shard(cfg, RunStore(root, run_id), shard, clip_ref))
