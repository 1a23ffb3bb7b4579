"""One task per step function of `m3po_core.stages` (installed as `m3po.tasks.stage_tasks`).

Caching is the store's, not Prefect's: a shard complete in the manifest under its cache key is
skipped by the stage function itself, which also works for shards that ran on another worker or
in an earlier flow run. Prefect's own result cache is therefore off (`NO_CACHE`).
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from m3po_core.config import RunConfig
from m3po_core.stages import base_models, evaluate as evaluate_step, prompts, sample, score, select, train as train_step
from m3po_core.stages.runner import ShardResult
from m3po_core.store import RunStore
from m3po.tasks.shard_jobs import run_shard_job


def _info(msg: str) -> None:
    get_run_logger().info(msg)


@task(name="prepare-prompts", cache_policy=NO_CACHE)
def prepare_prompts(cfg: RunConfig, store: RunStore) -> int:
    n = prompts.prepare_prompts(cfg, store)
    _info(f"prompts: {n} shards at {store.url('prompts')}")
    return n


@task(name="base-model", cache_policy=NO_CACHE)
def ensure_base_model(cfg: RunConfig, store: RunStore) -> str:
    return base_models.ensure_base_model(cfg, store, log_fn=_info)


@task(name="clip-encoder", cache_policy=NO_CACHE)
def ensure_clip(cfg: RunConfig, store: RunStore) -> str:
    return base_models.ensure_clip(cfg, store, log_fn=_info)


@task(name="sample-shard", task_run_name="sample-shard-{shard:05d}", cache_policy=NO_CACHE)
def sample_shard(cfg: RunConfig, store: RunStore, shard: int, model_ref: str) -> ShardResult:
    result = sample.sample_shard(cfg, store, shard, model_ref)
    _info(f"candidates shard {shard}: {result.rows} rows " + ("(cached)" if result.cached else f"computed in {result.seconds:.1f}s"))
    return result


@task(name="score-shard", task_run_name="score-shard-{shard:05d}", cache_policy=NO_CACHE)
def score_shard(cfg: RunConfig, store: RunStore, shard: int, clip_ref: str) -> ShardResult:
    result = score.score_shard(cfg, store, shard, clip_ref)
    _info(f"scores shard {shard}: {result.rows} rows " + ("(cached)" if result.cached else f"computed in {result.seconds:.1f}s"))
    return result


@task(name="select-pairs", cache_policy=NO_CACHE)
def select_pairs(cfg: RunConfig, store: RunStore, n_shards: int) -> dict[str, Any]:
    stats = select.select(cfg, store, n_shards)
    _info(f"pairs: {stats['pairs']} of {stats['groups']} prompts ({stats['skipped_no_mas_gap']} without MAS gap)")
    return stats


@task(name="train-lora-dpo", cache_policy=NO_CACHE)
def train(cfg: RunConfig, store: RunStore, model_ref: str) -> dict[str, Any]:
    return train_step.train(cfg, store, model_ref, log_fn=_info)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: RunConfig, store: RunStore, model_ref: str) -> dict[str, Any]:
    return evaluate_step.evaluate(cfg, store, model_ref, log_fn=_info)


# -- one shard away from the parent flow run (shard deployments, task workers) -------------------
# Plain parameters (the configuration as a dict, root, run id): they travel through the API and the
# scheduling storage, so no live object (file system, model) and no credential goes with them.

@task(name="sample-shard-job", task_run_name="sample-{run_id}-{shard}", cache_policy=NO_CACHE)
def sample_shard_job(config: dict[str, Any], root: str, run_id: str, shard: int, model_ref: str) -> dict[str, Any]:
    # a task worker serves one GPU (`m3po worker --limit` shards at once): no pool-wide slot besides
    return run_shard_job(sample.sample_shard, "candidates", config, root, run_id, shard, model_ref)


@task(name="score-shard-job", task_run_name="score-{run_id}-{shard}", cache_policy=NO_CACHE)
def score_shard_job(config: dict[str, Any], root: str, run_id: str, shard: int, clip_ref: str) -> dict[str, Any]:
    return run_shard_job(score.score_shard, "scores", config, root, run_id, shard, clip_ref)


@task(name="evaluate-base", cache_policy=NO_CACHE)
def evaluate_base(cfg: RunConfig, store: RunStore, model_ref: str) -> dict[str, Any]:
    return evaluate_step.evaluate_base(cfg, store, model_ref, log_fn=_info)
