"""Fan a stage's shards out and gather them: the machinery the stage flows share.

    in_process    one task run per shard on the flow run's task runner (the embedded default)
    ray           tasks on a Ray cluster through prefect-ray, models kept loaded in Ray's workers
    deployment    one flow run per shard of the shard deployments, on a GPU work pool
    task_worker   one background task run per shard, taken by long-lived `m3po worker` processes

Every mode reports progress as shards finish and fails naming the failed shards only after every
other shard finished (their results stay in the store; a re-run skips them). Limit: the remote
modes read back one state per outstanding shard per poll.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from m3po_core import progress as terminal
from m3po_core.config import RunConfig
from m3po_core.errors import M3POError
from m3po_core.stages.runner import ShardResult
from m3po_core.store import RunStore
from m3po.tasks import stage_tasks


def fan_out(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref: str, stage: str,
            ref_name: str | None = None, extra: dict[str, Any] | None = None,
            wait_for: list | None = None) -> list[ShardResult]:
    """Run every shard: as tasks of this flow run (in_process), as flow runs of the shard deployment
    (deployment), as background task runs on `m3po worker` processes (task_worker) or as tasks on
    a Ray cluster (ray). Progress as
    shards finish; fail naming the failed shards only after every other shard finished (their
    results stay in the store, and a re-run skips them). `wait_for`: upstream futures the shard
    tasks depend on beyond their arguments (drawn as edges of the run graph)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"{store.run_id}-{stage}-progress".lower().replace("_", "-"),
                                        description=f"{stage} shards finished")
    ref_name = ref_name or ("model_ref" if stage == "candidates" else "clip_ref")
    mode = cfg.execution.shards
    if mode == "in_process":
        outcomes = map_shards(task_fn, cfg, store, n_shards, ref_name, ref, progress, extra, wait_for)
    elif mode == "ray":
        outcomes = _on_ray(cfg)(task_fn, cfg, store, n_shards, ref_name, ref, progress, extra)
    elif extra:
        raise M3POError(f"{stage}: these shards run in the flow run's process or on Ray "
                        f"(execution.shards: in_process or ray), not {mode!r}")
    else:
        outcomes = _remote_shards(cfg, store, n_shards, ref_name, ref, stage, progress)
    failed = {s: o for s, o in sorted(outcomes.items()) if isinstance(o, str)}
    for shard, msg in failed.items():
        logger.error(f"{stage} shard {shard} failed: {msg}")
    if failed:
        detail = "; ".join(f"shard {s}: {msg}" for s, msg in failed.items())
        raise M3POError(f"{stage}: {len(failed)} of {n_shards} shards failed ({detail}). Finished shards are kept; "
                        f"fix the input and run `m3po rerun-failed {store.run_id}` to recompute only these.")
    return [outcomes[s] for s in range(n_shards)]


def map_shards(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref_name: str, ref: str,
               progress, extra: dict[str, Any] | None = None, wait_for: list | None = None) -> dict[int, ShardResult | str]:
    """One task run per shard on this flow's task runner; each shard's result or error message."""
    outcomes: dict[int, ShardResult | str] = {}
    futures = task_fn.map(cfg=unmapped(cfg), store=unmapped(store), shard=list(range(n_shards)),
                          **{ref_name: unmapped(ref)}, **{k: unmapped(v) for k, v in (extra or {}).items()},
                          wait_for=wait_for)
    shard_of = {f.task_run_id: i for i, f in enumerate(futures)}
    terminal.shards(n_shards)
    for done, fut in enumerate(as_completed(futures), start=1):
        try:
            outcomes[shard_of[fut.task_run_id]] = fut.result()
        except Exception as e:
            outcomes[shard_of[fut.task_run_id]] = f"{type(e).__name__}: {e}"
        _count(outcomes[shard_of[fut.task_run_id]])
        update_progress_artifact(progress, 100.0 * done / n_shards)
    return outcomes


def _count(outcome: ShardResult | str) -> None:
    """One more shard finished, on the terminal's progress line (a failed one adds no rows)."""
    if isinstance(outcome, ShardResult):
        terminal.shard_done(outcome.rows, outcome.cached)
    else:
        terminal.shard_done()


@flow(name="m3po-ray-shards")
def ray_shards(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref_name: str, ref: str,
               progress, extra: dict[str, Any] | None = None) -> dict[int, ShardResult | str]:
    """The shards as tasks on Ray, `execution.ray_gpus_per_shard` GPUs each. Ray's worker processes
    live on, so each keeps its model loaded across the shards it runs."""
    from prefect_ray.context import remote_options

    # max_calls=0: Ray would otherwise end a GPU task's worker after one call (and its loaded model)
    with remote_options(num_gpus=cfg.execution.ray_gpus_per_shard, max_calls=0):
        return map_shards(task_fn, cfg, store, n_shards, ref_name, ref, progress, extra)


def _on_ray(cfg: RunConfig):
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise M3POError("execution.shards=ray needs prefect-ray: pip install '.[ray]'") from None
    ex = cfg.execution
    if ex.ray_address is None and ex.ray_gpus_per_shard > 0:
        import torch

        if not torch.cuda.is_available():
            raise M3POError(f"execution.ray_gpus_per_shard={ex.ray_gpus_per_shard}: a local Ray instance on this "
                            "machine has no GPU, so no shard could ever be scheduled; set it to 0 or point "
                            "execution.ray_address at a cluster with GPUs")
    runner = RayTaskRunner(address=ex.ray_address, init_kwargs={"include_dashboard": False})
    return ray_shards.with_options(task_runner=runner, flow_run_name=f"shards-on-ray-{cfg.name}",
                                   validate_parameters=False)


def _remote_shards(cfg: RunConfig, store: RunStore, n_shards: int, ref_name: str, ref: str, stage: str,
                   progress) -> dict[int, ShardResult | str]:
    """Submit one run per shard (a flow run of the shard deployment on its work pool, or a background
    task run for the task workers), then poll until all are final. Any number of GPU workers share
    them. A shard's outcome is read back from the store's manifest."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise M3POError(f"execution.shards={cfg.execution.shards!r} hands shards to workers through a Prefect server: "
                        "set PREFECT_API_URL (on the ephemeral API no worker would ever take them)")
    started = warned_at = time.time()
    runs = {shard: _submit_shard(cfg, stage, {"config": cfg.to_dict(), "root": store.root, "run_id": store.run_id,
                                              "shard": shard, ref_name: ref})
            for shard in range(n_shards)}
    outcomes: dict[int, ShardResult | str] = {}
    terminal.shards(n_shards)
    with get_client(sync_client=True) as client:
        read_state = (lambda i: client.read_flow_run(i).state) if cfg.execution.shards == "deployment" else \
            (lambda i: client.read_task_run(i).state)
        while len(outcomes) < n_shards:
            waiting = []  # shards no worker has taken yet (read once per pass, reported below)
            for shard, run_id in runs.items():
                if shard in outcomes:
                    continue
                state = read_state(run_id)
                if state is not None and state.is_scheduled():
                    waiting.append(shard)
                if (outcome := _shard_outcome(cfg, store, stage, shard, run_id, state, started)) is not None:
                    outcomes[shard] = outcome
                    _count(outcome)
                    update_progress_artifact(progress, 100.0 * len(outcomes) / n_shards)
            if len(outcomes) < n_shards:
                if time.time() - warned_at > 120:  # say so when nothing takes the shards (no worker running?)
                    _warn_waiting(cfg, stage, waiting, started)
                    warned_at = time.time()
                time.sleep(cfg.execution.poll_seconds)
    return outcomes


def _shard_outcome(cfg: RunConfig, store: RunStore, stage: str, shard: int, run_id, state,
                   started: float) -> ShardResult | str | None:
    """A remote shard's result, its error message, or None while its run is not final."""
    if state is None or not state.is_final():
        timeout = cfg.execution.shard_timeout_seconds
        if timeout is not None and time.time() - started > timeout:
            return (f"no result after {timeout:g}s (run {run_id} "
                    f"{state.type.value if state else 'without state'}): is a worker running?")
        return None
    entry = store.shard_entry(stage, shard) or {}
    if state.is_completed() and entry.get("state") == "complete":
        cached = entry.get("finished_at", 0.0) < started  # skipped by its cache key
        return ShardResult(stage, shard, entry["rows"], cached, entry.get("seconds", 0.0))
    return entry.get("error") or f"run {run_id} ended {state.type.value}: {state.message}"


def _warn_waiting(cfg: RunConfig, stage: str, waiting: list[int], started: float) -> None:
    if waiting:
        who = "an `m3po worker`" if cfg.execution.shards == "task_worker" else "a worker of the pool"
        get_run_logger().warning(f"{stage}: {len(waiting)} shards still waiting for {who} "
                                 f"after {time.time() - started:.0f}s (e.g. shard {waiting[0]})")


def _submit_shard(cfg: RunConfig, stage: str, params: dict[str, Any]):
    tags = [f"run:{params['run_id']}", f"shard:{params['shard']}"]
    if cfg.execution.shards == "deployment":
        from prefect.deployments import run_deployment

        name = cfg.execution.sample_deployment if stage == "candidates" else cfg.execution.score_deployment
        return run_deployment(name, parameters=params, timeout=0, tags=tags).id
    from prefect import tags as tag_context

    job = stage_tasks.sample_shard_job if stage == "candidates" else stage_tasks.score_shard_job
    with tag_context(*tags):
        return job.delay(**params).task_run_id
