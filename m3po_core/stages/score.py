"""DAG step 4, score: the MAS of every candidate (alignment encoder + vision judge), one shard at a time.

    scores/shard-*.parquet (+ manifest, with what the judge spent)    clip, judge aspects, mas

A shard the judge left candidates unrated in is retried by later runs, up to RATING_ATTEMPTS;
its record keeps what every attempt spent. Under a judge budget (m3po_core/scoring/budget.py) the
candidates past it are left unrated and counted apart (`unrated_budget`, with the budget in force):
a run with a larger budget scores the shard again, asking the judge only for the rows it lacks.
Limit: one shard of candidates is scored at a time per
process (the judge's usage delta is the shard's).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

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
    cand_entry = store.shard_entry("candidates", shard)
    if not cand_entry or cand_entry.get("state") != COMPLETE:
        raise RuntimeError(f"scores shard {shard}: candidates shard {shard} is not complete")
    key = stage_key(cfg, "scores", cand_entry["sha256"], clip_ref)
    return score_table(cfg, store, "scores", shard, key, clip_ref, lambda: store.read_shard("candidates", shard))


def score_table(cfg: RunConfig, store: RunStore, stage: str, shard: int, key: str, clip_ref: str,
                read_candidates: Callable[[], pa.Table], rows: list[dict[str, Any]] | None = None,
                images: list | None = None) -> ShardResult:
    """Score the candidates `read_candidates` gives as shard `shard` of `stage` (the scores stage,
    or an adaptive round's), recording what the judge spent and what it left unrated."""
    from m3po_core.scoring.budget import JudgeBudget, budget_raised
    from m3po_core.scoring.mas import known_ratings, score_candidates

    usage: dict[str, Any] = {}
    unrated = {"n": 0, "budget": 0}
    budget_box: dict[str, Any] = {}
    # A retry of a shard left with unrated candidates: its record is replaced, so what the earlier
    # attempts spent is carried into the new one (the report's requests, tokens and cost stay whole).
    previous = store.shard_entry(stage, shard) or {}
    retry = previous.get("key") == key and (retry_unrated(previous) or budget_raised(previous, cfg.scoring))
    spent_before = previous.get("judge_usage", {}) if retry else {}
    attempts = previous.get("attempts", 1) + (1 if retry_unrated(previous) else 0) if retry else 1

    def compute() -> pa.Table:
        prompt_rows = rows if rows is not None else read_prompts_shard(store, shard)
        shard_images = images if images is not None else load_shard_images(prompt_rows, shard)
        cands = read_candidates()
        # a retry asks the judge only for what the published shard lacks (its other ratings are kept)
        known = known_ratings(store.read_shard(stage, shard)) if retry and store.shard_intact(stage, shard, previous) \
            else None
        clip = components.clip_encoder(cfg, store, clip_ref)
        judge = components.judge(cfg, store)
        with device_slot():  # one shard at a time per process: the judge's usage delta is this shard's
            budget = JudgeBudget.for_run(cfg.scoring, store)  # the run's spend as of now
            before = dict(getattr(judge, "usage", {}))
            table = score_candidates(prompt_rows, shard_images, cands, clip, cfg.scoring, judge=judge, budget=budget,
                                     known=known)
            after = dict(getattr(judge, "usage", {}))
        usage.update({k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))})
        if after.get("cost") is not None:
            usage["cost"] = after["cost"] - (before.get("cost") or 0.0)
        for k in SPENDING:
            if isinstance(spent_before.get(k), (int, float)) and usage.get(k) is not None:
                usage[k] += spent_before[k]
        # candidates with no rating at all (an ensemble's candidate one judge rated has a score);
        # those past the budget are counted apart: they are not the judge's failures
        missing = int(np.isnan(table.column("judge").to_numpy(zero_copy_only=False).astype(float)).sum())
        unrated["budget"] = budget.unrated if budget else 0
        unrated["n"] = missing - unrated["budget"]
        if budget:
            budget_box.update(budget.limits())
        if unrated["budget"]:
            log.warning("%s shard %d: %d candidate(s) left unrated at the judge budget (%s); a run with a larger "
                        "budget rates them", stage, shard, unrated["budget"], budget_text(budget_box))
        if unrated["n"]:
            log.warning("%s shard %d: %d candidate(s) left unrated after attempt %d of %d%s", stage, shard,
                        unrated["n"], attempts, RATING_ATTEMPTS,
                        "; a re-run retries them" if attempts < RATING_ATTEMPTS else "")
        return table

    def record() -> dict[str, Any]:
        if not usage:
            return {}
        return {"judge_usage": usage, "unrated": unrated["n"], "attempts": attempts,
                **({"unrated_budget": unrated["budget"], "judge_budget": budget_box} if budget_box else {})}

    # What this shard cost the judge (requests, tokens, cost), in its manifest record for the report;
    # `unrated` (ratings still missing after the judge's retries) makes the store treat the shard as
    # not done, so a re-run asks the judge again for those (the rated rest are kept from the published shard).
    return run_shard(store, stage, shard, key, compute, schema.SCORES, extra=record,
                     lease_seconds=cfg.execution.lease_seconds, stale=lambda e: budget_raised(e, cfg.scoring))


def budget_text(limits: dict[str, Any]) -> str:
    parts = [f"{limits['max_requests']} requests" if limits.get("max_requests") is not None else "",
             f"cost {limits['max_cost']}" if limits.get("max_cost") is not None else ""]
    return " and ".join(p for p in parts if p) or "none"
