"""DAG steps 3 and 4 in rounds (`sampling.adaptive`): a shard sampled and scored round by round,
each prompt until its pair is settled (the rule: m3po_core/adaptive.py).

    rounds/candidates-rNN/shard-*.parquet (+ manifest)   round NN: k more candidates per open prompt
    rounds/scores-rNN/shard-*.parquet (+ manifest)       their scores, with what the judge spent
    candidates/shard-*.parquet, scores/shard-*.parquet   all rounds together, as the fixed-N stages write them

Round r of a shard is a cached shard of its own, keyed by the prompts it samples and its candidate
indices [r*k, (r+1)*k): an interrupted run resumes at the first round not done, and a run with a
larger n (or another stopping rule) reuses every round whose prompts are the same. Candidate j of
a prompt is drawn with seed(prompt) + j, so round r holds the candidates that fixed-N sampling with
`sampling.seeding: candidate` draws at those indices. The scores stage then finds this shard's
scores complete under its own key. A round the judge budget cut short ends the shard's rounds: the
prompts it left unrated stay open, and a run with a larger budget rates them and goes on.
Limit: the shard's images and every round's candidates are held together (as the fixed-N stage:
64 prompts x 32 at most); a round waits for the previous round's scores.
"""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from m3po_core import schema
from m3po_core.adaptive import n_rounds, round_span, settled
from m3po_core.components import sampler_for
from m3po_core.config import RunConfig
from m3po_core.stages import base_models
from m3po_core.stages.prompts import load_shard_images, read_prompts_shard, validate_prompts
from m3po_core.stages.runner import ShardResult, device_slot, fingerprint, run_shard, stage_key
from m3po_core.stages.score import score_table
from m3po_core.store import RunStore, round_stage

log = logging.getLogger("m3po.stages")
ORDER = [("prompt_id", "ascending"), ("cand_idx", "ascending")]


def sample_and_score_shard(cfg: RunConfig, store: RunStore, shard: int, model_ref: str) -> ShardResult:
    s = cfg.sampling
    prompts_entry = store.shard_entry("prompts", shard)
    clip_ref = base_models.ensure_clip(cfg, store, log_fn=log.debug)  # built by the flow before the fan-out
    rows = read_prompts_shard(store, shard)
    validate_prompts(rows, f"prompts shard {shard}")
    images = load_shard_images(rows, shard)
    at = {r["prompt_id"]: i for i, r in enumerate(rows)}
    open_ids = [r["prompt_id"] for r in rows]
    cands, scores, records, cached = [], [], [], True
    stopped_at: dict[str, int] = {}
    for r in range(n_rounds(s.n, s.round_size)):
        if not open_ids:
            break
        first, end = round_span(r, s.n, s.round_size)
        sub_rows = [rows[at[p]] for p in open_ids]
        sub_images = [images[at[p]] for p in open_ids]
        c_stage, s_stage = round_stage("candidates", r), round_stage("scores", r)
        c_key = stage_key(cfg, "candidates_round", prompts_entry["sha256"], model_ref, first, end, fingerprint(open_ids))
        c_result = run_shard(store, c_stage, shard, c_key,
                             lambda: sample_round(cfg, store, model_ref, sub_rows, sub_images, first, end),
                             schema.CANDIDATES, lease_seconds=cfg.execution.lease_seconds)
        c_entry = store.shard_entry(c_stage, shard)
        s_key = stage_key(cfg, "scores_round", c_entry["sha256"], clip_ref)
        s_result = score_table(cfg, store, s_stage, shard, s_key, clip_ref,
                               lambda: store.read_shard(c_stage, shard), rows=sub_rows, images=sub_images)
        s_entry = store.shard_entry(s_stage, shard)
        cached &= c_result.cached and s_result.cached
        cands.append(store.read_shard(c_stage, shard).sort_by(ORDER))
        scores.append(store.read_shard(s_stage, shard).sort_by(ORDER))
        records.append((c_entry, s_entry))
        pool = joined(pa.concat_tables(cands), pa.concat_tables(scores), cfg.selection.logp)
        done = settled(pool, rounds_done=r + 1, settle_gap=s.settle_gap, settle_rounds=s.settle_rounds,
                       strategy=cfg.selection.strategy, alpha=cfg.selection.alpha, delta=cfg.selection.delta,
                       seed=cfg.selection.seed)
        for p in open_ids:
            if p in done or end >= s.n:
                stopped_at[p] = end
        open_ids = [p for p in open_ids if p not in stopped_at]
        if s_entry.get("unrated_budget"):
            log.warning("candidates shard %d: the judge budget ended its rounds at round %d; %d prompt(s) still open",
                        shard, r, len(open_ids))
            break
    return publish(cfg, store, shard, model_ref, clip_ref, prompts_entry, cands, scores, records, stopped_at,
                   open_ids, cached)


def sample_round(cfg: RunConfig, store: RunStore, model_ref: str, rows: list[dict[str, Any]], images: list,
                 first: int, end: int) -> pa.Table:
    """Candidates first..end-1 of each prompt, candidate j drawn with seed(prompt) + j."""
    from m3po_core.sampling import SamplingParams, prompt_seed

    s = cfg.sampling
    sampler = sampler_for(cfg, store, model_ref)
    params = SamplingParams(n=end - first, temperature=s.temperature, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, seed=s.seed)
    out: dict[str, list] = {c: [] for c in schema.CANDIDATES.names}
    for start in range(0, len(rows), s.batch_prompts):
        batch = rows[start: start + s.batch_prompts]
        seeds = [prompt_seed(s.seed, p["prompt_id"]) + first for p in batch]
        with device_slot():
            drawn = sampler.sample(images[start: start + len(batch)], [p["instruction"] for p in batch], params, seeds)
        for p, row_cands in zip(batch, drawn):
            for j, c in enumerate(row_cands):
                schema.add_candidate(out, p["prompt_id"], first + j, c, sampler.name, "")
    return pa.table(out, schema=schema.CANDIDATES)


def joined(cands: pa.Table, scores: pa.Table, logp: str) -> pa.Table:
    """What the stopping rule reads: keys, log P (as `logp`), perturbation, MAS and the judge's rating."""
    cands, scores = cands.sort_by(ORDER), scores.sort_by(ORDER)
    for k in ("prompt_id", "cand_idx"):
        if not cands.column(k).equals(scores.column(k)):
            raise RuntimeError("an adaptive round's candidates and scores do not cover the same (prompt_id, cand_idx)")
    return pa.table({"prompt_id": cands.column("prompt_id"), "cand_idx": cands.column("cand_idx"),
                     "logp": cands.column(logp), "perturbation": cands.column("perturbation"),
                     "mas": scores.column("mas"), "judge": scores.column("judge")})


def publish(cfg: RunConfig, store: RunStore, shard: int, model_ref: str, clip_ref: str, prompts_entry: dict[str, Any],
            cands: list[pa.Table], scores: list[pa.Table], records: list[tuple[dict, dict]],
            stopped_at: dict[str, int], open_ids: list[str], cached: bool) -> ShardResult:
    """The rounds together as the candidates and scores shards; both carry the rounds' fingerprint,
    so a shard whose rounds changed (a larger budget or n) is written again."""
    rounds = fingerprint([(c["sha256"], s["sha256"]) for c, s in records])
    stale = (lambda e: e.get("rounds") != rounds)
    counts: dict[str, int] = {}
    for m in stopped_at.values():
        counts[str(m)] = counts.get(str(m), 0) + 1
    info = {"rounds": rounds, "adaptive": {"rounds": len(records), "stopped_at": counts, "open": len(open_ids)}}
    c_key = stage_key(cfg, "candidates", prompts_entry["sha256"], model_ref)
    c_result = run_shard(store, "candidates", shard, c_key, lambda: pa.concat_tables(cands).sort_by(ORDER),
                         schema.CANDIDATES, extra=lambda: info, stale=stale)
    usage: dict[str, Any] = {}
    for _, rec in records:  # the rounds' spend added up (a cost is known only if every round's is)
        for k, v in (rec.get("judge_usage") or {}).items():
            if k == "cost":
                usage["cost"] = None if v is None or usage.get("cost", 0.0) is None else usage.get("cost", 0.0) + v
            elif isinstance(v, (int, float)):
                usage[k] = usage.get(k, 0) + v
    budget = next((rec["judge_budget"] for _, rec in reversed(records) if rec.get("judge_budget")), None)
    extra = {"rounds": rounds, "unrated": sum(rec.get("unrated", 0) for _, rec in records),
             "attempts": max([rec.get("attempts", 1) for _, rec in records] or [1]),
             **({"judge_usage": usage} if usage else {}),
             **({"unrated_budget": sum(rec.get("unrated_budget", 0) for _, rec in records), "judge_budget": budget}
                if budget else {})}
    s_key = stage_key(cfg, "scores", store.shard_entry("candidates", shard)["sha256"], clip_ref)
    run_shard(store, "scores", shard, s_key, lambda: pa.concat_tables(scores).sort_by(ORDER), schema.SCORES,
              extra=lambda: extra, stale=stale)
    return ShardResult("candidates", shard, c_result.rows, cached and c_result.cached, c_result.seconds)
