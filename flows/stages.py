"""The stage flows. Each takes the run configuration as a plain dict, the store root and the run id,
so it can run alone, as a subflow of the pipeline, or as a deployment.

    generate:  prepare prompts -> base model -> sample shard 0..S-1 (fan-out)
    score:     CLIP encoder -> score shard 0..S-1 (fan-out)
    select:    candidates + scores -> pairs.parquet
    train:     pairs -> LoRA adapter
    evaluate:  base and trained model on the held-out benchmarks -> metrics.json
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from m3po_core.config import RunConfig, config_from_dict
from m3po_core.errors import M3POError
from m3po_core.stages import ShardResult
from m3po_core.store import RunStore
from tasks import stages as t


def _open(config: dict[str, Any], root: str, run_id: str) -> tuple[RunConfig, RunStore]:
    return config_from_dict(config), RunStore(root, run_id)


def fan_out(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref: str, stage: str,
            ref_name: str | None = None, extra: dict[str, Any] | None = None) -> list[ShardResult]:
    """Run every shard: as tasks of this flow run (in_process), as flow runs of the shard deployment
    (deployment), as background task runs on `m3po worker` processes (task_worker) or as tasks on
    a Ray cluster (ray). Progress as
    shards finish; fail naming the failed shards only after every other shard finished (their
    results stay in the store, and a re-run skips them)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"{store.run_id}-{stage}-progress".lower().replace("_", "-"),
                                        description=f"{stage} shards finished")
    ref_name = ref_name or ("model_ref" if stage == "candidates" else "clip_ref")
    mode = cfg.execution.shards
    if mode == "in_process":
        outcomes = map_shards(task_fn, cfg, store, n_shards, ref_name, ref, progress, extra)
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
               progress, extra: dict[str, Any] | None = None) -> dict[int, ShardResult | str]:
    """One task run per shard on this flow's task runner; each shard's result or error message."""
    outcomes: dict[int, ShardResult | str] = {}
    futures = task_fn.map(cfg=unmapped(cfg), store=unmapped(store), shard=list(range(n_shards)),
                          **{ref_name: unmapped(ref)}, **{k: unmapped(v) for k, v in (extra or {}).items()})
    shard_of = {f.task_run_id: i for i, f in enumerate(futures)}
    for done, fut in enumerate(as_completed(futures), start=1):
        try:
            outcomes[shard_of[fut.task_run_id]] = fut.result()
        except Exception as e:
            outcomes[shard_of[fut.task_run_id]] = f"{type(e).__name__}: {e}"
        update_progress_artifact(progress, 100.0 * done / n_shards)
    return outcomes


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
    started = time.time()
    warned_at = started
    runs = {}
    with get_client(sync_client=True) as client:
        for shard in range(n_shards):
            params = {"config": cfg.to_dict(), "root": store.root, "run_id": store.run_id, "shard": shard, ref_name: ref}
            runs[shard] = _submit_shard(cfg, stage, params)
        read_state = (lambda i: client.read_flow_run(i).state) if cfg.execution.shards == "deployment" else \
            (lambda i: client.read_task_run(i).state)
        outcomes: dict[int, ShardResult | str] = {}
        while len(outcomes) < n_shards:
            waiting = []  # shards no worker has taken yet (read once per pass, reported below)
            for shard, run_id in runs.items():
                if shard in outcomes:
                    continue
                state = read_state(run_id)
                if state is not None and state.is_scheduled():
                    waiting.append(shard)
                if state is None or not state.is_final():
                    timeout = cfg.execution.shard_timeout_seconds
                    if timeout is not None and time.time() - started > timeout:
                        outcomes[shard] = (f"no result after {timeout:g}s (run {run_id} "
                                           f"{state.type.value if state else 'without state'}): is a worker running?")
                        update_progress_artifact(progress, 100.0 * len(outcomes) / n_shards)
                    continue
                entry = store.shard_entry(stage, shard) or {}
                if state.is_completed() and entry.get("state") == "complete":
                    cached = entry.get("finished_at", 0.0) < started  # skipped by its cache key
                    outcomes[shard] = ShardResult(stage, shard, entry["rows"], cached, entry.get("seconds", 0.0))
                else:
                    outcomes[shard] = entry.get("error") or f"run {run_id} ended {state.type.value}: {state.message}"
                update_progress_artifact(progress, 100.0 * len(outcomes) / n_shards)
            if len(outcomes) < n_shards:
                if time.time() - warned_at > 120:  # say so when nothing takes the shards (no worker running?)
                    if waiting:
                        who = "an `m3po worker`" if cfg.execution.shards == "task_worker" else "a worker of the pool"
                        get_run_logger().warning(f"{stage}: {len(waiting)} shards still waiting for {who} "
                                                 f"after {time.time() - started:.0f}s (e.g. shard {waiting[0]})")
                    warned_at = time.time()
                time.sleep(cfg.execution.poll_seconds)
    return outcomes


def _submit_shard(cfg: RunConfig, stage: str, params: dict[str, Any]):
    tags = [f"run:{params['run_id']}", f"shard:{params['shard']}"]
    if cfg.execution.shards == "deployment":
        from prefect.deployments import run_deployment

        name = cfg.execution.sample_deployment if stage == "candidates" else cfg.execution.score_deployment
        return run_deployment(name, parameters=params, timeout=0, tags=tags).id
    from prefect import tags as tag_context

    job = t.sample_shard_job if stage == "candidates" else t.score_shard_job
    with tag_context(*tags):
        return job.delay(**params).task_run_id


@flow(name="m3po-generate", flow_run_name="generate-{run_id}")
def generate(config: dict[str, Any], root: str, run_id: str) -> dict[str, Any]:
    cfg, store = _open(config, root, run_id)
    n_shards = t.prepare_prompts(cfg, store)
    model_ref = t.ensure_base_model(cfg, store)
    results = fan_out(t.sample_shard, cfg, store, n_shards, model_ref, "candidates")
    return {"n_shards": n_shards, "model_ref": model_ref, "rows": sum(r.rows for r in results),
            "computed": sum(not r.cached for r in results)}


@flow(name="m3po-score", flow_run_name="score-{run_id}")
def score(config: dict[str, Any], root: str, run_id: str, n_shards: int) -> dict[str, Any]:
    cfg, store = _open(config, root, run_id)
    clip_ref = t.ensure_clip(cfg, store)
    results = fan_out(t.score_shard, cfg, store, n_shards, clip_ref, "scores")
    return {"clip_ref": clip_ref, "rows": sum(r.rows for r in results), "computed": sum(not r.cached for r in results)}


@flow(name="m3po-select", flow_run_name="select-{run_id}")
def select(config: dict[str, Any], root: str, run_id: str, n_shards: int) -> dict[str, Any]:
    cfg, store = _open(config, root, run_id)
    return t.select_pairs(cfg, store, n_shards)


@flow(name="m3po-train", flow_run_name="train-{run_id}")
def train(config: dict[str, Any], root: str, run_id: str, model_ref: str) -> dict[str, Any]:
    cfg, store = _open(config, root, run_id)
    return t.train(cfg, store, model_ref)


@flow(name="m3po-evaluate", flow_run_name="evaluate-{run_id}")
def evaluate(config: dict[str, Any], root: str, run_id: str, model_ref: str) -> dict[str, Any]:
    cfg, store = _open(config, root, run_id)
    return t.evaluate(cfg, store, model_ref)
