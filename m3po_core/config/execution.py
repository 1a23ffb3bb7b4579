"""The execution section: where the sampling and scoring shards run (in process, deployments on a
work pool, task workers, Ray). Limit: it declares types, defaults and meanings; checks.py checks values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ExecutionConfig:
    """Where the sampling and scoring shards run. Not part of any cache key: it changes where
    shards are computed, not what they hold."""

    shards: Literal["in_process", "deployment", "task_worker", "ray"] = field(default="in_process", metadata={
        "help": "in_process: tasks of the parent flow run (the embedded default); deployment: one flow run per "
                "shard of the shard deployments, on their work pool (see deployments/prefect.yaml); task_worker: "
                "one background task run per shard, taken by long-lived `m3po worker` processes that keep their "
                "models loaded across shards; ray: tasks on a Ray cluster through prefect-ray's task runner "
                "(`pip install '.[ray]'`), ray_gpus_per_shard GPUs each."})
    sample_deployment: str = field(default="m3po-sample-shard/m3po-sample-shard", metadata={
        "help": "shards deployment: the sampling shards' deployment (FLOW/DEPLOYMENT)."})
    score_deployment: str = field(default="m3po-score-shard/m3po-score-shard", metadata={
        "help": "shards deployment: the scoring shards' deployment (FLOW/DEPLOYMENT)."})
    shards_per_run: int = field(default=1, metadata={
        "help": "deployment: shards one flow run computes, one after the other (its process starts and loads "
                "its models once for all of them). A flow run is a process: on a GPU pool, where loading a 7B "
                "model takes a minute or more, give each run minutes of work (the LLaVA-1.5 configs: 16); a run "
                "that dies costs its shards not yet done, which a re-run computes."})
    poll_seconds: float = field(default=2.0, metadata={
        "help": "deployment / task_worker: seconds between reads of the submitted shards' states."})
    shard_timeout_seconds: Optional[float] = field(default=None, metadata={
        "help": "deployment / task_worker: a shard with no final state this long after the stage submitted its "
                "shards fails the stage (its worker died, or none runs); size it for the whole stage. None: wait."})
    lease_seconds: Optional[float] = field(default=60.0, metadata={
        "help": "A running shard renews a lease in the store every lease_seconds / 4 (`{stage}/_leases/`); "
                "deployment / task_worker: a shard whose run is still running but whose lease is older than "
                "this (its worker was killed, its node pre-empted) is submitted again. Hosts' clocks must agree "
                "within a fraction of it. None: no leases (then only shard_timeout_seconds ends a wait)."})
    lease_resubmits: int = field(default=2, metadata={
        "help": "deployment / task_worker: how often a shard whose lease lapsed is submitted again before it "
                "fails the stage."})
    gpu_concurrency_limit: str = field(default="m3po-gpu", metadata={
        "help": "Global concurrency limit each shard flow run holds (deployment: one slot per shard; a task worker's "
                "shards take none, its `--limit` being its GPUs; "
                "create it with as many slots as GPUs, `prefect gcl create m3po-gpu --limit 8`; absent, no slot is "
                "asked for: a process looks it up once a minute, flows/machinery/gpu_slot.py)."})
    ray_address: Optional[str] = field(default=None, metadata={
        "help": "None: a local Ray instance; \"auto\" or \"ray://head:10001\": a cluster."})
    ray_gpus_per_shard: float = field(default=1.0, metadata={
        "help": "Ray's num_gpus per shard task (0 on a CPU-only cluster)."})
