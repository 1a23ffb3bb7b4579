"""DAG step 4, score: the MAS of every candidate (alignment encoder + vision judge), one shard at a time.

    scores/shard-*.parquet (+ manifest, with what the judge spent)    clip, judge aspects, mas

A shard the judge left candidates unrated in is retried by later runs, up to RATING_ATTEMPTS;
its record keeps what every attempt spent. Limit: one shard of candidates is scored at a time per
process (the judge's usage delta is the shard's).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from m3po_core import components, schema
from m3po_core.config import RunConfig
from m3po_core.stages.prompts import load_shard_images, read_prompts_shard
from m3po_core.stages.runner import ShardResult, device_slot, run_shard, stage_key
from m3po_core.store import COMPLETE, RATING_ATTEMPTS, RunStore, retry_unrated

log = logging.getLogger("m3po.stages")


SPENDING = ("requests", "failed_requests", "prompt_tokens", "completion_tokens", "cost")  # judge usage that adds up


def score_shard(cfg: RunConfig, store: RunStore, shard: int, clip_ref: str) -> ShardResult:
    from m3po_core.scoring.mas import score_candidates

    cand_entry = store.shard_entry("candidates", shard)
    if not cand_entry or cand_entry.get("state") != COMPLETE:
        raise RuntimeError(f"scores shard {shard}: candidates shard {shard} is not complete")
    key = stage_key(cfg, "scores", cand_entry["sha256"], clip_ref)
    usage: dict[str, Any] = {}
    unrated = {"n": 0}
    # A retry of a shard left with unrated candidates: its record is replaced, so what the earlier
    # attempts spent is carried into the new one (the report's requests, tokens and cost stay whole).
    previous = store.shard_entry("scores", shard) or {}
    retry = previous.get("key") == key and retry_unrated(previous)
    spent_before = previous.get("judge_usage", {}) if retry else {}
    attempts = previous.get("attempts", 1) + 1 if retry else 1

    def compute() -> pa.Table:
        rows = read_prompts_shard(store, shard)
        images = load_shard_images(rows, shard)
        cands = store.read_shard("candidates", shard)
        clip = components.clip_encoder(cfg, store, clip_ref)
        judge = components.judge(cfg, store)
        with device_slot():  # one shard at a time per process: the judge's usage delta is this shard's
            before = dict(getattr(judge, "usage", {}))
            table = score_candidates(rows, images, cands, clip, cfg.scoring, judge=judge)
            after = dict(getattr(judge, "usage", {}))
        usage.update({k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))})
        if after.get("cost") is not None:
            usage["cost"] = after["cost"] - (before.get("cost") or 0.0)
        for k in SPENDING:
            if isinstance(spent_before.get(k), (int, float)) and usage.get(k) is not None:
                usage[k] += spent_before[k]
        # candidates with no rating at all (an ensemble's candidate one judge rated has a score)
        unrated["n"] = int(np.isnan(table.column("judge").to_numpy(zero_copy_only=False).astype(float)).sum())
        if unrated["n"]:
            log.warning("scores shard %d: %d candidate(s) left unrated after attempt %d of %d%s", shard,
                        unrated["n"], attempts, RATING_ATTEMPTS,
                        "; a re-run retries them" if attempts < RATING_ATTEMPTS else "")
        return table

    # What this shard cost the judge (requests, tokens, cost), in its manifest record for the report;
    # `unrated` (ratings still missing after the judge's retries) makes the store treat the shard as
    # not done, so a re-run asks the judge again for those (the rest come from its cache).
    return run_shard(store, "scores", shard, key, compute, schema.SCORES,
                      extra=lambda: {"judge_usage": usage, "unrated": unrated["n"], "attempts": attempts}
                      if usage else {}, lease_seconds=cfg.execution.lease_seconds)
