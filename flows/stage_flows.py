"""The stage flows. Each takes the run configuration (a RunConfig: the pipeline passes its own object;
a deployment's or the UI's JSON mapping is parsed into one by Prefect's parameter validation, pydantic
over the same dataclasses), the store root and the run id, so it can run alone, as a subflow of the
pipeline, or as a deployment.

    generate:  prepare prompts -> base model -> sample shard 0..S-1 (fan-out; sampling.adaptive: CLIP
               encoder, then each shard sampled and scored in rounds)
    score:     CLIP encoder -> score shard 0..S-1 (fan-out)
    select:    candidates + scores -> pairs.parquet
    train:     pairs -> LoRA adapter
    evaluate:  base and trained model on the held-out benchmarks -> metrics.json

The pipelines run generate and score as subflows and the other three as tasks of their own flow
run; select, train and evaluate are flows here for running one stage alone (their deployments in
deployments/prefect.yaml).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from m3po_core import progress as terminal
from m3po_core.config import RunConfig, validate
from m3po_core.store import RunStore
from m3po.flows.machinery.fan_out import fan_out
from m3po.tasks import stage_tasks as st


def open_run(cfg: RunConfig, root: str, run_id: str) -> tuple[RunConfig, RunStore]:
    """The configuration, checked across sections (cheap; a mapping from a deployment was typed by
    Prefect, not by `load_config`), and the run's store."""
    return validate(cfg), RunStore(root, run_id)


def judge_pilot(task_fn, cfg: RunConfig, store: RunStore, n_shards: int, ref: str, stage: str) -> None:
    """With a model judge or a judge budget: shard 0 is scored first, alone, and what the stage will
    cost the judge (requests, tokens, cost: shard 0's measured usage times the shards) is printed
    before the other shards start."""
    from m3po_core.scoring.budget import projection

    s = cfg.scoring
    paid = s.judge != "reference" or s.extra_judges or s.max_judge_requests is not None or s.max_judge_cost is not None
    if n_shards < 2 or not paid:
        return
    fan_out(task_fn, cfg, store, 1, ref, stage)
    if line := projection(store.shard_entry("scores", 0) or {}, n_shards, s):
        get_run_logger().info(line)
        terminal.note(line)


@flow(name="m3po-generate", flow_run_name="generate-{run_id}")
def generate(config: RunConfig, root: str, run_id: str) -> dict[str, Any]:
    cfg, store = open_run(config, root, run_id)
    prompts = st.prepare_prompts.submit(cfg, store)  # a future, so the shards can wait for it by name
    n_shards = prompts.result()
    model_ref = st.ensure_base_model(cfg, store)
    if cfg.sampling.adaptive:  # rounds score as they go (m3po_core/stages/adaptive_rounds.py): the encoder first
        st.ensure_clip(cfg, store)
        judge_pilot(st.sample_shard, cfg, store, n_shards, model_ref, "candidates")
    results = fan_out(st.sample_shard, cfg, store, n_shards, model_ref, "candidates", wait_for=[prompts])
    return {"n_shards": n_shards, "model_ref": model_ref, "rows": sum(r.rows for r in results),
            "computed": sum(not r.cached for r in results)}


@flow(name="m3po-score", flow_run_name="score-{run_id}")
def score(config: RunConfig, root: str, run_id: str, n_shards: int) -> dict[str, Any]:
    cfg, store = open_run(config, root, run_id)
    clip_ref = st.ensure_clip(cfg, store)
    judge_pilot(st.score_shard, cfg, store, n_shards, clip_ref, "scores")
    results = fan_out(st.score_shard, cfg, store, n_shards, clip_ref, "scores")
    return {"clip_ref": clip_ref, "rows": sum(r.rows for r in results), "computed": sum(not r.cached for r in results)}


@flow(name="m3po-select", flow_run_name="select-{run_id}")
def select(config: RunConfig, root: str, run_id: str, n_shards: int) -> dict[str, Any]:
    cfg, store = open_run(config, root, run_id)
    return st.select_pairs(cfg, store, n_shards)


@flow(name="m3po-train", flow_run_name="train-{run_id}")
def train(config: RunConfig, root: str, run_id: str, model_ref: str) -> dict[str, Any]:
    cfg, store = open_run(config, root, run_id)
    return st.train(cfg, store, model_ref)


@flow(name="m3po-evaluate", flow_run_name="evaluate-{run_id}")
def evaluate(config: RunConfig, root: str, run_id: str, model_ref: str) -> dict[str, Any]:
    cfg, store = open_run(config, root, run_id)
    return st.evaluate(cfg, store, model_ref)
