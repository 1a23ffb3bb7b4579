"""What every pipeline (M3PO's, IPA's) does around its DAG: the run's record and tags before the
first stage, each stage's wall time, and the report card with its artifacts after the last.

Limit: the report is built from the store, so it shows what the stages wrote, whichever process
or earlier run wrote it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from m3po_core import progress
from m3po_core.config import RunConfig
from m3po_core.report import build_report
from m3po_core.run_summary import inline_plots
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
    """Runs the pipeline's stages: the terminal's line per stage (m3po_core/progress.py) and each
    stage's wall time for the report. Prefect records both too, but a task's end state reaches the
    API as an event the server writes later, so the report, built in the same flow run right after
    the last stage, cannot count on reading them back."""

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
