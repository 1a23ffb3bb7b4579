"""The M3PO DAG, end to end:

    generate (prompts, base model, sample shards) -> score (CLIP, judge, MAS per shard)
      -> select (M3P-Score pairs) -> train (LoRA-DPO) -> evaluate (base vs trained) -> report
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from m3po_core import stages as stages_lib
from m3po_core.config import config_from_dict, load_config
from m3po_core.report import build_report
from m3po_core.store import RunStore
from flows import stages


@flow(name="m3po-pipeline", flow_run_name="m3po-{run_id}")
def m3po_pipeline(config: dict[str, Any] | None = None, root: str = "./m3po-runs", run_id: str = "demo",
                  config_file: str | None = None) -> dict[str, Any]:
    """`config` (a full run configuration) or `config_file` (a YAML path on the worker; default
    configs/demo.yaml): deployments and schedules pass a file, `m3po run` the loaded config."""
    cfg = config_from_dict(config) if config is not None else load_config(config_file)
    config = cfg.to_dict()
    store = RunStore(root, run_id)
    store.write_json("config.json", cfg.to_dict())  # what `m3po rerun-failed` runs again
    tag_flow_run(f"run:{run_id}", f"config:{cfg.name}", f"strategy:{cfg.selection.strategy}")
    logger = get_run_logger()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.time()
        out = fn(*args, **kwargs)
        timings[name] = time.time() - t0
        return out

    gen = timed("generate", stages.generate, config, root, run_id)
    sc = timed("score", stages.score, config, root, run_id, gen["n_shards"])
    pair_stats = timed("select", stages.select, config, root, run_id, gen["n_shards"])
    timed("train", stages.train, config, root, run_id, gen["model_ref"])
    metrics = timed("evaluate", stages.evaluate, config, root, run_id, gen["model_ref"])

    prompt_stage = store.read_json("prompts/_stage.json")
    info = {"timings": timings, "n_prompts": prompt_stage["n_prompts"], "filter": prompt_stage.get("filter"),
            "computed_shards": {"candidates": gen["computed"], "scores": sc["computed"]}}
    info.update(_model_quality(stages_lib.resolve_model(store, gen["model_ref"]),
                               stages_lib.resolve_model(store, sc["clip_ref"])))
    markdown, rows = build_report(cfg, store, gen["n_shards"], info)
    key = f"m3po-{run_id}".lower().replace("_", "-")
    create_markdown_artifact(_inline_plots(markdown, store), key=f"{key}-report", description="M3PO report card")
    create_table_artifact(rows, key=f"{key}-metrics", description="base vs M3PO on held-out benchmarks")
    create_table_artifact([pair_stats], key=f"{key}-pairs", description="pair selection statistics")
    logger.info(f"report: {store.url('report.md')}")
    return {"metrics": {k: metrics[k] for k in ("base", "m3po")}, "pairs": pair_stats, "info": info,
            "report": store.url("report.md")}


def tag_flow_run(*tags: str) -> None:
    """Tags that say which run and configuration this is, also on runs a schedule or the UI started."""
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    run = get_run_context().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted(set(run.tags) | set(tags)))


def _inline_plots(markdown: str, store: RunStore) -> str:
    """The report for the UI: its plots embedded as data URLs (the UI cannot read the run's store;
    report.md itself keeps relative links beside plots/*.png)."""
    import base64
    import re

    def embed(m: re.Match) -> str:
        data = base64.b64encode(store.read_bytes(m.group(2))).decode()
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\((plots/[\w.-]+\.png)\)", embed, markdown)


def _model_quality(model_ref: str, clip_ref: str) -> dict[str, Any]:
    """Quality figures the models built here carry (warm-start accuracy, CLIP retrieval)."""
    import json
    import os

    out: dict[str, Any] = {}
    for name, path in (("base_quality", f"{model_ref}/m3po_warm_start.json"),
                       ("clip_quality", f"{clip_ref}/m3po_clip.json")):
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            out[name] = data.get("metrics", data)
    return out
