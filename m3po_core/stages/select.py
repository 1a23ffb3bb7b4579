"""DAG step 5, select: the preference pairs, argmax MAS against argmax M3P-Score (m3po_core/selection.py).

    pairs.parquet, pairs_stats.json (with the pools' diagnostics: m3po_core/selection_diagnostics.py)

A prompt's pair depends on its own candidates only, so shards are selected one at a time. Limit:
every shard's pairs are held until the stage writes pairs.parquet (one pair per prompt).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from m3po_core import schema
from m3po_core.config import RunConfig
from m3po_core.selection import SelectionStats, effective_alpha, select_pairs
from m3po_core.selection_diagnostics import PoolDiagnostics
from m3po_core.stages.runner import done_record, stage_key
from m3po_core.store import COMPLETE, RunStore


def shard_candidates_with_scores(store: RunStore, shard: int, columns: list[str] | None = None) -> pa.Table:
    """One shard's candidates (every column, or the keys and `columns`) with their scores, one row per
    (prompt_id, cand_idx), in that order."""
    order = [("prompt_id", "ascending"), ("cand_idx", "ascending")]
    for stage in ("candidates", "scores"):
        if (store.shard_entry(stage, shard) or {}).get("state") != COMPLETE:
            raise RuntimeError(f"{store.url(stage)}: shard {shard} is not complete")
    if columns is not None:
        columns = ["prompt_id", "cand_idx", *(c for c in columns if c in schema.CANDIDATES.names)]
    cands = store.read_shard("candidates", shard, columns).sort_by(order)
    scores = store.read_shard("scores", shard).sort_by(order)
    # Arrow's hash join cannot carry list columns (token_ids): align by sorted keys instead.
    for k in ("prompt_id", "cand_idx"):
        if not cands.column(k).equals(scores.column(k)):
            raise RuntimeError(f"{store.url()}: candidates and scores shard {shard} do not cover the same "
                               "(prompt_id, cand_idx)")
    for name in scores.column_names[2:]:
        cands = cands.append_column(name, scores.column(name))
    return cands


def candidates_with_scores(store: RunStore, n_shards: int, columns: list[str] | None = None) -> pa.Table:
    """Every shard's candidates with their scores; with `columns`, only those (read shard by shard,
    so the texts and token ids of millions of candidates are never in memory together)."""
    tables = (shard_candidates_with_scores(store, i, columns) for i in range(n_shards))
    return pa.concat_tables([t if columns is None else t.select(columns) for t in tables])


def select(cfg: RunConfig, store: RunStore, n_shards: int) -> dict[str, Any]:
    """pairs.parquet (+ pairs_stats.json) from every candidate and score shard.

    A prompt's pair depends on its own candidates only, so shards are selected one at a time: at
    the paper's scale (150K prompts x 32 candidates) the texts and token ids of every candidate
    would not fit in memory at once, and only the chosen and rejected ones are ever needed."""
    sel = cfg.selection
    inputs = [store.shard_entry(st, i)["sha256"] for st in ("candidates", "scores") for i in range(n_shards)]
    key = stage_key(cfg, "pairs", inputs)
    if (record := done_record(store, "pairs_stats.json", key)) is not None and store.exists("pairs.parquet"):
        return record
    parts, stats = [], SelectionStats(0, 0, 0, 0, 0)
    diagnostics = PoolDiagnostics(sel.alpha, sel.delta, sel.seed)
    for shard in range(n_shards):
        table = shard_candidates_with_scores(store, shard)
        scored = table.append_column("logp", table.column(sel.logp))
        chosen, shard_stats = select_pairs(scored, alpha=sel.alpha, delta=sel.delta, strategy=sel.strategy,
                                           seed=sel.seed)
        diagnostics.add(scored, m3po_pairs=chosen if sel.strategy == "m3po" else None)
        stats += shard_stats
        if chosen.num_rows:
            parts.append(_pairs_with_texts(store, shard, chosen, table))
    pairs = pa.concat_tables(parts).sort_by("prompt_id") if parts else schema.PAIRS.empty_table()
    info = store.write_table("pairs.parquet", pairs, schema.PAIRS, row_group_size=schema.PAIRS_ROW_GROUP)
    result = {"key": key, **stats.as_dict(), "sha256": info["sha256"], "strategy": sel.strategy,
              "alpha": effective_alpha(sel.strategy, sel.alpha), "delta": sel.delta, "logp": sel.logp,
              "mean_mas_gap": _mean(pairs, "mas_chosen", "mas_rejected"),
              "mean_logp_gap": _mean(pairs, "logp_chosen", "logp_rejected"),
              "diagnostics": diagnostics.summary()}
    store.write_json("pairs_stats.json", result)
    return result


def _pairs_with_texts(store: RunStore, shard: int, chosen: pa.Table, candidates: pa.Table) -> pa.Table:
    """A shard's selected pairs with their prompt (image, instruction) and both responses' texts and
    token ids. Rows are taken by index (an Arrow hash join would allocate its output for 32K rows,
    and every shard's pairs are kept until the stage ends)."""
    pid = chosen.column("prompt_id").to_pylist()
    prompts = store.read_shard("prompts", shard, ["prompt_id", "image", "instruction"])
    prompt_row = {p: r for r, p in enumerate(prompts.column("prompt_id").to_pylist())}
    cand_row = {k: r for r, k in enumerate(zip(candidates.column("prompt_id").to_pylist(),
                                               candidates.column("cand_idx").to_pylist()))}
    if missing := sorted(set(pid) - prompt_row.keys()):
        raise RuntimeError(f"{store.url('prompts')}: shard {shard} lacks prompts {missing[:5]} that its "
                           "candidates answer (was the prompts stage re-run without sampling?)")
    pairs = chosen
    rows = pa.array([prompt_row[p] for p in pid], pa.int64())
    for name in ("image", "instruction"):
        pairs = pairs.append_column(name, prompts.column(name).take(rows))
    for name in ("chosen", "rejected"):
        rows = pa.array([cand_row[(p, i)] for p, i in zip(pid, chosen.column(f"{name}_idx").to_pylist())], pa.int64())
        pairs = pairs.append_column(name, candidates.column("text").take(rows))
        pairs = pairs.append_column(f"{name}_token_ids", candidates.column("token_ids").take(rows))
    return pairs


def _mean(t: pa.Table, a: str, b: str) -> float:
    if t.num_rows == 0:
        return float("nan")
    return float(np.mean(t.column(a).to_numpy() - t.column(b).to_numpy()))
