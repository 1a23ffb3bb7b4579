"""What every pipeline (M3PO's, IPA's) does around its DAG: the run's record and tags before the
first stage, each stage's wall time, and the report card with its artifacts after the last.

Limit: the report is built from the store, so it shows what the stages wrote, whichever process
or earlier run wrote it.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from m3po_core import progress
from m3po_core.components import resolve_model
from m3po_core.config import RunConfig
from m3po_core.report import build_report
from m3po_core.store import RunStore


def start_run(cfg: RunConfig, store: RunStore, method: str, *tags: str) -> None:
    """The run's configuration (what `m3po rerun-failed` runs again, and with which method) and the
    tags that say which run this is, also on runs a schedule or the UI started."""
    store.write_json("config.json", cfg.to_dict())
    if method != "m3po":
        store.write_json("method.json", {"method": method})
    tag_flow_run(f"run:{store.run_id}", f"config:{cfg.name}", *tags)


def tag_flow_run(*tags: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    run = get_run_context().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted(set(run.tags) | set(tags)))


class StageClock:
    """Runs the pipeline's stages and keeps each one's wall time (the report's timings)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, stage: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        progress.begin(name)
        try:
            out = stage(*args, **kwargs)
        finally:
            progress.end()
        self.timings[name] = time.time() - t0
        return out


@task(name="report", cache_policy=NO_CACHE)
def report(cfg: RunConfig, store: RunStore, method: str, n_shards: int, info: dict[str, Any],
           extra_table: tuple[str, list[dict[str, Any]], str]) -> str:
    """report.md and plots in the run, and the report card, the metrics table and `extra_table`
    (key suffix, rows, description) as artifacts in the UI; returns the report's URL."""
    markdown, rows = build_report(cfg, store, n_shards, info)
    key = f"{method}-{store.run_id}".lower().replace("_", "-")
    label = "M3PO" if method == "m3po" else method.upper()
    create_markdown_artifact(inline_plots(markdown, store), key=f"{key}-report", description=f"{label} report card")
    flat = [{**{k: v for k, v in r.items() if k != "interval"},
             "ci95_low": (r["interval"] or {}).get("low"), "ci95_high": (r["interval"] or {}).get("high")} for r in rows]
    create_table_artifact(flat, key=f"{key}-metrics", description=f"base vs {label} on held-out benchmarks "
                                                                   "(ci95: paired bootstrap interval of the delta)")
    suffix, table, description = extra_table
    create_table_artifact(table, key=f"{key}-{suffix}", description=description)
    get_run_logger().info(f"report: {store.url('report.md')}")
    return store.url("report.md")


def run_info(store: RunStore, timings: dict[str, float], computed_shards: dict[str, int]) -> dict[str, Any]:
    """What the report says about the run beside the metrics: stage times, prompts, the filter."""
    prompt_stage = store.read_json("prompts/_stage.json")
    return {"timings": timings, "n_prompts": prompt_stage["n_prompts"], "filter": prompt_stage.get("filter"),
            "computed_shards": computed_shards}


def inline_plots(markdown: str, store: RunStore) -> str:
    """The report for the UI: its plots embedded as data URLs (the UI cannot read the run's store;
    report.md itself keeps relative links beside plots/*.png)."""
    def embed(m: re.Match) -> str:
        data = base64.b64encode(store.read_bytes(m.group(2))).decode()
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\((plots/[\w.-]+\.png)\)", embed, markdown)


def model_quality(store: RunStore, model_ref: str, clip_ref: str) -> dict[str, Any]:
    """Quality figures the models built here carry (warm-start accuracy, CLIP retrieval)."""
    out: dict[str, Any] = {}
    for name, path in (("base_quality", f"{resolve_model(store, model_ref)}/m3po_warm_start.json"),
                       ("clip_quality", f"{resolve_model(store, clip_ref)}/m3po_clip.json")):
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            out[name] = data.get("metrics", data)
    return out
