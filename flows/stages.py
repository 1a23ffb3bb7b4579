"""The stage flows. Each takes the run configuration as a plain dict, the store root and the run id,
so it can run alone, as a subflow of the pipeline, or as a deployment.

    generate:  prepare prompts -> base model -> sample shard 0..S-1 (fan-out)
    score:     CLIP encoder -> score shard 0..S-1 (fan-out)
    select:    candidates + scores -> pairs.parquet
    train:     pairs -> LoRA adapter
    evaluate:  base and trained model on the held-out benchmarks -> metrics.json
"""
from __future__ import annotations

from typing import Any, Callable

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


def fan_out(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref: str, stage: str) -> list[ShardResult]:
    """Run a shard task over every shard; progress as shards finish; fail naming the failed shards
    only after every other shard finished (their results stay in the store)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"{store.run_id}-{stage}-progress".lower().replace("_", "-"),
                                        description=f"{stage} shards finished")
    futures = task_fn.map(cfg=unmapped(cfg), store=unmapped(store), shard=list(range(n_shards)), **{
        "model_ref" if stage == "candidates" else "clip_ref": unmapped(ref)})
    results: list[ShardResult] = []
    failed: dict[int, str] = {}
    shard_of = {f.task_run_id: i for i, f in enumerate(futures)}
    for done, fut in enumerate(as_completed(futures), start=1):
        shard = shard_of[fut.task_run_id]
        try:
            results.append(fut.result())
        except Exception as e:
            failed[shard] = f"{type(e).__name__}: {e}"
            logger.error(f"{stage} shard {shard} failed: {failed[shard]}")
        update_progress_artifact(progress, 100.0 * done / n_shards)
    if failed:
        detail = "; ".join(f"shard {s}: {msg}" for s, msg in sorted(failed.items()))
        raise M3POError(f"{stage}: {len(failed)} of {n_shards} shards failed ({detail}). Finished shards are kept; "
                        f"fix the input and run again to recompute only these.")
    return sorted(results, key=lambda r: r.shard)


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
