"""Fan a stage's shards out and gather them: the machinery the stage flows share.

    in_process    one task run per shard on the flow run's task runner (the embedded default)
    ray           tasks on a Ray cluster through prefect-ray, models kept loaded in Ray's workers
    deployment    one flow run per shard of the shard deployments, on a GPU work pool
    task_worker   one background task run per shard, taken by long-lived `m3po worker` processes

Every mode reports progress as shards finish and fails naming the failed shards only after every
other shard finished (their results stay in the store; a re-run skips them). The remote modes
(flows/machinery/remote_shards.py) read every shard's state in one API call per poll; the progress artifact
is updated at most once a second (in process, Ray) or once per poll (remote), not once per shard.
Limit: the error names the first MAX_NAMED failed shards; `m3po status RUN --all` lists them all.
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

MAX_NAMED = 20  # failed shards named in the stage's error (the log and `m3po status` have every one)
PROGRESS_EVERY = 1.0  # seconds between progress artifact updates of in-process and Ray shards


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
        from m3po.flows.machinery.remote_shards import remote_shards

        terminal.shards(n_shards)

        def on_finished(batch: dict[int, ShardResult | str], done: int) -> None:
            for outcome in batch.values():
                _count(outcome)
            update_progress_artifact(progress, 100.0 * done / n_shards)  # one call per poll, whatever the batch

        outcomes = remote_shards(cfg, store, n_shards, ref_name, ref, stage, on_finished)
    failed = {s: o for s, o in sorted(outcomes.items()) if isinstance(o, str)}
    for shard, msg in failed.items():
        logger.error(f"{stage} shard {shard} failed: {msg}")
    if failed:
        detail = _grouped(failed)
        if len(failed) > MAX_NAMED:
            detail += f"; and {len(failed) - MAX_NAMED} more: see `m3po status {store.run_id}`"
        raise M3POError(f"{stage}: {len(failed)} of {n_shards} shards failed ({detail}). Finished shards are kept; "
                        f"fix the input and run `m3po rerun-failed {store.run_id}` to recompute only these.")
    return [outcomes[s] for s in range(n_shards)]


def _grouped(failed: dict[int, str]) -> str:
    """The first MAX_NAMED failed shards, those with the same message named together
    (`shard 3: msg`, `shards 16-31: msg`: a run of several shards that died fails them alike)."""
    from m3po_core.status import ranges

    by_message: dict[str, list[int]] = {}
    for shard, msg in list(failed.items())[:MAX_NAMED]:
        by_message.setdefault(msg, []).append(shard)
    return "; ".join(f"shard {shards[0]}: {msg}" if len(shards) == 1 else f"shards {', '.join(ranges(shards))}: {msg}"
                     for msg, shards in by_message.items())


def map_shards(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref_name: str, ref: str,
               progress, extra: dict[str, Any] | None = None, wait_for: list | None = None) -> dict[int, ShardResult | str]:
    """One task run per shard on this flow's task runner; each shard's result or error message."""
    outcomes: dict[int, ShardResult | str] = {}
    futures = task_fn.map(cfg=unmapped(cfg), store=unmapped(store), shard=list(range(n_shards)),
                          **{ref_name: unmapped(ref)}, **{k: unmapped(v) for k, v in (extra or {}).items()},
                          wait_for=wait_for)
    shard_of = {f.task_run_id: i for i, f in enumerate(futures)}
    terminal.shards(n_shards)
    sent = time.time()
    for done, fut in enumerate(as_completed(futures), start=1):
        try:
            outcomes[shard_of[fut.task_run_id]] = fut.result()
        except Exception as e:
            outcomes[shard_of[fut.task_run_id]] = f"{type(e).__name__}: {e}"
        _count(outcomes[shard_of[fut.task_run_id]])
        if done == n_shards or time.time() - sent >= PROGRESS_EVERY:  # an API call each: not one per shard
            update_progress_artifact(progress, 100.0 * done / n_shards)
            sent = time.time()
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
