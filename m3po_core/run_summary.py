"""What a finished run says besides its metrics, as plain functions of the store and the
pipeline's result: the report's run facts (stage times, prompts, the filter, the models' own
quality figures), the report card with its plots inlined for the UI, and the lines `m3po run`
prints at the end.

Limit: everything is read from the store, so it shows what the stages wrote, whichever process or
earlier run wrote it.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
from typing import Any

from m3po_core.components import resolve_model
from m3po_core.report import HEADLINE, comparison_rows, ipa_rounds_table, markdown_table, win_rate_line
from m3po_core.selection_diagnostics import describe
from m3po_core.store import RunStore


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


def terminal_summary(result: dict[str, Any], method: str) -> list[str]:
    """What `m3po run` (or `m3po ipa`) prints after the DAG: the headline table of the benchmarks
    the run asked for, the judge's win rate, the pairs and what the selection did (selection_diagnostics)."""
    rows = [r for r in comparison_rows(result["metrics"])[:len(HEADLINE)] if not math.isnan(r["base"])]
    lines = [markdown_table(rows, trained=method)]
    if line := win_rate_line(result["metrics"]):
        lines.append(line)
    p = result["pairs"]
    if method == "ipa":
        lines += ["", f"pairs: {p['pairs']} over {len(p['ipa_rounds'])} round(s); "
                      f"{p['unresolved_after_last_round']} prompts still unresolved", *ipa_rounds_table(p["ipa_rounds"])]
    else:
        lines += ["", f"pairs: {p['pairs']} of {p['groups']} prompts; mean MAS gap {p['mean_mas_gap']:.3f}, "
                      f"mean log P gap {p['mean_logp_gap']:.3f}", *describe(p.get("diagnostics", {}))]
    return lines
