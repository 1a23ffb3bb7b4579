"""DAG step 3, sample: N candidates per prompt from the base policy, one shard at a time.

    candidates/shard-*.parquet (+ manifest)    text, token ids, raw log P (sum, mean), finish reason, seed

A shard's key is its prompts shard's content hash, the sampling configuration and the base model
reference. With `sampling.adaptive` the shard is sampled and scored in rounds instead
(m3po_core/stages/adaptive_rounds.py), which writes this stage's shard and the scores stage's.
Limit: a shard's images and candidates are held in memory together (64 prompts x 32).
"""
from __future__ import annotations

import pyarrow as pa

from m3po_core import schema
from m3po_core.components import sampler_for
from m3po_core.config import RunConfig
from m3po_core.stages.prompts import load_shard_images, read_prompts_shard, validate_prompts
from m3po_core.stages.runner import ShardResult, device_slot, run_shard, stage_key
from m3po_core.store import RunStore


def sample_shard(cfg: RunConfig, store: RunStore, shard: int, model_ref: str) -> ShardResult:
    from m3po_core.sampling import SamplingParams, batch_seed, prompt_seed

    s = cfg.sampling
    if s.adaptive:
        from m3po_core.stages.adaptive_rounds import sample_and_score_shard

        return sample_and_score_shard(cfg, store, shard, model_ref)
    prompts_entry = store.shard_entry("prompts", shard)
    key = stage_key(cfg, "candidates", prompts_entry["sha256"], model_ref)

    def compute() -> pa.Table:
        rows = read_prompts_shard(store, shard)
        validate_prompts(rows, f"prompts shard {shard}")
        images = load_shard_images(rows, shard)
        sampler = sampler_for(cfg, store, model_ref)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=s.seed)
        out: dict[str, list] = {c: [] for c in schema.CANDIDATES.names}
        for start in range(0, len(rows), s.batch_prompts):
            batch = rows[start: start + s.batch_prompts]
            seed = [prompt_seed(s.seed, r["prompt_id"]) for r in batch] if s.per_candidate_seeds \
                else batch_seed(s.seed, [r["prompt_id"] for r in batch])
            with device_slot():
                cands = sampler.sample(images[start: start + len(batch)], [r["instruction"] for r in batch],
                                       params, seed)
            for r, row_cands in zip(batch, cands):
                for j, c in enumerate(row_cands):
                    schema.add_candidate(out, r["prompt_id"], j, c, sampler.name, "")
            if s.contrastive_n:  # extra candidates on perturbed images: hard negatives (never chosen)
                from m3po_core import perturb

                jobs = [(r, k, *perturb.draw(s.seed, r["prompt_id"], k))
                        for r in batch for k in range(s.contrastive_n)]
                by_id = {r["prompt_id"]: images[start + i] for i, r in enumerate(batch)}
                one = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p,
                                     max_new_tokens=s.max_new_tokens, seed=s.seed)
                with device_slot():
                    cands = sampler.sample([perturb.perturb(by_id[r["prompt_id"]], kind, ps) for r, _, kind, ps in jobs],
                                           [r["instruction"] for r, *_ in jobs], one,
                                           batch_seed(s.seed + CONTRASTIVE_SEED, [r["prompt_id"] for r in batch]))
                for (r, k, kind, _), (c,) in zip(jobs, cands):
                    schema.add_candidate(out, r["prompt_id"], s.n + k, c, sampler.name, kind)
        return pa.table(out, schema=schema.CANDIDATES)

    return run_shard(store, "candidates", shard, key, compute, schema.CANDIDATES,
                     lease_seconds=cfg.execution.lease_seconds)


CONTRASTIVE_SEED = 1_000_003  # the contrastive calls' seeds come from another stream than the normal samples'
