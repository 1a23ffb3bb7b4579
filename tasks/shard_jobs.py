"""One shard, or a deployment run's group of shards, computed away from the parent flow run (shard
deployments, task workers), for any stage function: the shard's lease, the run's GPU slot
(flows/machinery/gpu_slot.py) and the shards' outcomes. Light on imports (no stage, no model), so the
orchestration bench's noop stage (tests/noop_stage.py) runs the very same code as real shards.
Limit: the shards of a group run one after the other in this process.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from m3po_core.config import RunConfig, config_from_dict
from m3po_core.stages.runner import ShardResult, shard_lease
from m3po_core.store import RunStore
from m3po.flows.machinery.gpu_slot import RunSlot


def run_shard_job(stage_fn: Callable[..., ShardResult], stage: str, config: RunConfig | dict[str, Any], root: str,
                  run_id: str, shard: int, ref: str, slot: RunSlot | None = None) -> dict[str, Any]:
    """Compute one shard under its lease. `slot`: the run's GPU slot (flows/machinery/gpu_slot.py), taken
    inside the lease, so the wait for a slot does not read as a dead worker; None (task workers):
    none, the worker's own `--limit` is its GPUs."""
    cfg = config if isinstance(config, RunConfig) else config_from_dict(config)  # a task worker's job: a dict
    store = RunStore(root, run_id)
    with shard_lease(store, stage, shard, cfg.execution.lease_seconds):
        if slot is not None:
            slot.take()
        return dataclasses.asdict(stage_fn(cfg, store, shard, ref))


def run_shard_group(stage_fn: Callable[..., ShardResult], stage: str, config: RunConfig | dict[str, Any], root: str,
                    run_id: str, shards: list[int], ref: str) -> dict[str, Any]:
    """A deployment's flow run: its shards (`execution.shards_per_run`) one after the other in this
    process, so its models load once (`m3po_core.components` keeps them), on one slot of the global
    concurrency limit (one per GPU, where the server has it) held from the first shard to the last.
    A shard that fails is recorded in its manifest record and the others still run; then the run
    fails naming the failed shards."""
    from m3po_core.errors import M3POError

    config = config if isinstance(config, RunConfig) else config_from_dict(config)  # once for the group
    with RunSlot(config.execution.gpu_concurrency_limit) as slot:
        if len(shards) == 1:  # a run of one shard fails with the shard's own error
            return {"shards": {shards[0]: run_shard_job(stage_fn, stage, config, root, run_id, shards[0], ref, slot)}}
        done, failed = {}, {}
        for shard in shards:
            try:
                done[shard] = run_shard_job(stage_fn, stage, config, root, run_id, shard, ref, slot)
            except Exception as e:  # noqa: BLE001 (its record has the error; the fan-out reads it there)
                failed[shard] = f"{type(e).__name__}: {e}"
    if failed:
        raise M3POError(f"{stage}: {len(failed)} of {len(shards)} shards of this run failed: "
                        + "; ".join(f"shard {s}: {m}" for s, m in failed.items()))
    return {"shards": done}
