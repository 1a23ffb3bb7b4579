"""The IPA DAG (m3po_core/ipa.py) on the same store, shards, training and evaluation as M3PO:

    prompts, base model
      -> round r = 1..R:  [generator: DPO on rounds < r (self-evolution)] -> the round's prompts
                          (round 1: all; then the unresolved) -> sample + revise + verify per shard
                          (fan-out) -> pairs, unresolved
      -> all rounds' pairs -> train (LoRA-DPO) -> evaluate (base vs trained) -> report
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.pipeline import _inline_plots, tag_flow_run
from flows.stages import _open, fan_out
from m3po_core.config import check_ipa, config_from_dict, load_config
from m3po_core.report import build_report
from m3po_core.store import RunStore
from tasks import ipa as ti
from tasks import stages as t


@flow(name="ipa-rounds", flow_run_name="ipa-rounds-{run_id}")
def ipa_rounds(config: dict[str, Any], root: str, run_id: str) -> dict[str, Any]:
    """Prompts and base model, then IPA's rounds; ends with pairs.parquet."""
    cfg, store = _open(config, root, run_id)
    n_shards = t.prepare_prompts(cfg, store)
    model_ref = t.ensure_base_model(cfg, store)
    return {"n_shards": n_shards, "model_ref": model_ref, **collect_pairs(cfg, store, n_shards, model_ref)}


def collect_pairs(cfg, store: RunStore, n_shards: int, model_ref: str) -> dict[str, Any]:
    """IPA's rounds on a run's prompts (any store: a run, or an experiment cell sharing its prompts)."""
    check_ipa(cfg)
    rounds_run, computed = 0, 0
    for r in range(1, cfg.ipa.rounds + 1):
        n_round = ti.prepare_round(cfg, store, r, n_shards)
        if n_round == 0:  # every prompt resolved
            break
        generator_rel = ti.generator(cfg, store, model_ref, r)
        results = fan_out(ti.ipa_shard, cfg, store, n_round, model_ref, f"ipa-round-{r}",
                          ref_name="model_ref", extra={"r": r, "generator_rel": generator_rel})
        computed += sum(not x.cached for x in results)
        ti.collect_round(cfg, store, r, n_round, model_ref)
        rounds_run = r
    stats = ti.finalize(cfg, store, rounds_run)
    return {"pairs": stats, "computed": computed}


@flow(name="ipa-pipeline", flow_run_name="ipa-{run_id}")
def ipa_pipeline(config: dict[str, Any] | None = None, root: str = "./m3po-runs", run_id: str = "demo-ipa",
                 config_file: str | None = None) -> dict[str, Any]:
    """IPA end to end; `config` or `config_file` as for the M3PO pipeline."""
    from flows import stages

    cfg = config_from_dict(config) if config is not None else load_config(config_file)
    config = cfg.to_dict()
    store = RunStore(root, run_id)
    store.write_json("config.json", config)  # what `m3po rerun-failed` runs again, and with which method:
    store.write_json("method.json", {"method": "ipa"})
    tag_flow_run(f"run:{run_id}", f"config:{cfg.name}", "method:ipa")
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = time.time() - t0
        return out

    rounds = timed("ipa rounds", ipa_rounds, config, root, run_id)
    timed("train", stages.train, config, root, run_id, rounds["model_ref"])
    metrics = timed("evaluate", stages.evaluate, config, root, run_id, rounds["model_ref"])
    prompt_stage = store.read_json("prompts/_stage.json")
    info = {"timings": timings, "n_prompts": prompt_stage["n_prompts"], "filter": prompt_stage.get("filter"),
            "computed_shards": {"ipa": rounds["computed"]}}
    markdown, rows = build_report(cfg, store, rounds["n_shards"], info)
    key = f"ipa-{run_id}".lower().replace("_", "-")
    create_markdown_artifact(_inline_plots(markdown, store), key=f"{key}-report", description="IPA report card")
    create_table_artifact(rows, key=f"{key}-metrics", description="base vs IPA on held-out benchmarks")
    create_table_artifact(rounds["pairs"]["ipa_rounds"], key=f"{key}-rounds", description="IPA rounds")
    get_run_logger().info(f"report: {store.url('report.md')}")
    return {"metrics": {k: metrics[k] for k in ("base", "m3po")}, "pairs": rounds["pairs"], "info": info,
            "report": store.url("report.md")}
