"""DAG step 3-5 of IPA, its rounds over the store (m3po_core/ipa.py is the method; this is where
its tables live).

    ipa/round-{r}/prompts/shard-*.parquet     the round's prompts (round 1: all; then the unresolved)
    ipa/round-{r}/responses/shard-*.parquet   sampled, contrastive and revised responses, verified
    ipa/round-{r}/pairs.parquet               verified against failed, one per prompt (PAIRS layout)
    ipa/round-{r}/feedback_pairs.parquet      the reviser's feedback pairs (P^fb)
    ipa/round-{r}/summary.json                per-round statistics and the unresolved prompt ids
    ipa/round-{r}/generator/                  rounds >= 2: the generator's LoRA adapter (self-evolution)
    pairs.parquet, pairs_stats.json           every round's pairs: M3PO's train and evaluate stages take over

Every table is cached under a key of its inputs, like M3PO's stages; a round's shards are computed,
failed and re-run one by one. Limit: a round's responses are read whole to pair them.
"""
from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Callable

import pyarrow as pa

from m3po_core import ipa, schema
from m3po_core.components import Adapter, cached, processor_for, release_engines, sampler_for
from m3po_core.config import RunConfig
from m3po_core.data.images import load_image
from m3po_core.stages.runner import ShardResult, device_slot, done_record, run_shard, stage_key
from m3po_core.stages.sample import CONTRASTIVE_SEED
from m3po_core.store import RunStore

log = logging.getLogger("m3po.stages.ipa")


def _round(r: int) -> str:
    return f"ipa/round-{r}"


def prepare_round(cfg: RunConfig, store: RunStore, r: int, n_prompt_shards: int) -> int:
    """The round's prompts in shards: every prompt in round 1, the previous round's unresolved ones
    after; returns the number of shards (0: nothing left to do)."""
    inputs = [store.shard_entry("prompts", i)["sha256"] for i in range(n_prompt_shards)]
    if r > 1:
        inputs.append(store.read_json(f"{_round(r - 1)}/summary.json")["key"])
    key = stage_key(cfg, "ipa", "prompts", r, inputs)
    marker = f"{_round(r)}/prompts/_stage.json"
    if (record := done_record(store, marker, key)) is not None:
        return record["n_shards"]
    rows = store.read_stage("prompts", n_prompt_shards).to_pylist()
    if r > 1:
        carried = set(store.read_json(f"{_round(r - 1)}/summary.json")["unresolved"])
        rows = [p for p in rows if p["prompt_id"] in carried]
    n_shards = 0
    for n_shards, start in enumerate(range(0, len(rows), cfg.data.shard_size), start=1):
        table = pa.Table.from_pylist(rows[start: start + cfg.data.shard_size], schema.PROMPTS)
        store.publish_shard(f"{_round(r)}/prompts", n_shards - 1, table, schema.PROMPTS, key)
    store.write_json(marker, {"key": key, "n_shards": n_shards, "n_prompts": len(rows)})
    return n_shards


# ------------------------------------------------------------------ the generator of a round

def generator(cfg: RunConfig, store: RunStore, model_ref: str, r: int,
              log_fn: Callable[[str], None] = log.info) -> str | None:
    """Self-evolution: from round 2 the generator is the base model with a LoRA adapter DPO-trained
    on the earlier rounds' pairs (and, with `ipa.reviser: policy`, their feedback pairs: the same
    model revises). Returns the adapter's store path, or None for the base model."""
    if r == 1 or not cfg.ipa.self_evolve:
        return None
    rel = f"{_round(r)}/generator"
    # the earlier rounds' summaries key their pairs: a cached generator costs no read of them
    key = stage_key(cfg, "train", "ipa-generator", r, cfg.ipa.reviser == "policy", model_ref,
                    [store.read_json(f"{_round(k)}/summary.json")["key"] for k in range(1, r)])
    if done_record(store, f"{rel}.json", key) is not None and store.dir_complete(rel):
        return rel
    tables = [store.read_table(f"{_round(k)}/pairs.parquet") for k in range(1, r)]
    if cfg.ipa.reviser == "policy":
        tables += [store.read_table(f"{_round(k)}/feedback_pairs.parquet") for k in range(1, r)]
    train_pairs = pa.concat_tables(tables)
    if train_pairs.num_rows == 0:
        return generator(cfg, store, model_ref, r - 1, log_fn)
    store.write_table(f"{rel}-pairs.parquet", train_pairs, schema.PAIRS)
    release_engines()
    t0 = time.time()
    from m3po_core.training import train_adapter

    with device_slot(), tempfile.TemporaryDirectory() as tmp:
        trained = train_adapter(cfg, store, model_ref, tmp, log_fn=log_fn, pairs_rel=f"{rel}-pairs.parquet")
        store.put_dir(tmp, rel)
    store.write_json(f"{rel}.json", {"key": key, "pairs": train_pairs.num_rows, "seconds": time.time() - t0,
                                     "steps": len([h for h in trained["history"] if "loss" in h]),
                                     "dropped_overlong_pairs": trained["dropped_overlong_pairs"]})
    log_fn(f"IPA round {r}: generator DPO-trained on {train_pairs.num_rows} pairs of rounds < {r}")
    return rel


def _generator_key(store: RunStore, rel: str | None) -> str | None:
    return store.read_json(f"{rel}.json")["key"] if rel else None


def policy_sampler(cfg: RunConfig, store: RunStore, model_ref: str, adapter_rel: str | None):
    """The sampling backend's sampler, with a generator adapter applied when there is one."""
    adapter = None if adapter_rel is None else Adapter(adapter_rel, _generator_key(store, adapter_rel), label="ipa")
    return sampler_for(cfg, store, model_ref, adapter)


def make_reviser(cfg: RunConfig, store: RunStore, model_ref: str, generator_rel: str | None):
    c = cfg.ipa
    if c.reviser == "reference":
        return ipa.ReferenceReviser(c.fix_rate, c.reference_fix_rate, c.seed)
    if c.reviser == "policy":
        return ipa.SamplerReviser(policy_sampler(cfg, store, model_ref, generator_rel), c.max_new_tokens,
                                  cfg.evaluation.batch_size)
    from m3po_core.sampling.openai_backend import OpenAICompatibleSampler

    return ipa.SamplerReviser(cached(("ipa-reviser", c.reviser, c.reviser_base_url), lambda: OpenAICompatibleSampler(
        model=c.reviser.removeprefix("openai:"), base_url=c.reviser_base_url, api_key_env=c.api_key_env,
        concurrency=c.concurrency)), c.max_new_tokens, cfg.evaluation.batch_size)


def make_verifier(cfg: RunConfig):
    c = cfg.ipa
    if c.verifier == "reference":
        return ipa.ReferenceVerifier()
    return cached(("ipa-verifier", c.verifier, c.verifier_base_url), lambda: ipa.OpenAIVerifier(
        c.verifier.removeprefix("openai:"), c.verifier_base_url, c.api_key_env, c.concurrency))


# ------------------------------------------------------------------ one shard of a round

def ipa_shard(cfg: RunConfig, store: RunStore, r: int, shard: int, model_ref: str,
              generator_rel: str | None) -> ShardResult:
    """Sample (normal + contrastive), revise, verify one shard of round r's prompts."""
    from m3po_core import perturb
    from m3po_core.models import completion_ids
    from m3po_core.sampling import SamplingParams, batch_seed

    c, s = cfg.ipa, cfg.sampling
    stage = f"{_round(r)}/responses"
    prompts_entry = store.shard_entry(f"{_round(r)}/prompts", shard)
    key = stage_key(cfg, "ipa", "responses", r, prompts_entry["sha256"], model_ref,
                    _generator_key(store, generator_rel))

    def compute() -> pa.Table:
        rows = store.read_shard(f"{_round(r)}/prompts", shard).to_pylist()
        images = [load_image(p["image"], f"IPA round {r} shard {shard}, prompt_id {p['prompt_id']!r}") for p in rows]
        sampler = policy_sampler(cfg, store, model_ref, generator_rel)
        out: dict[str, list] = {col: [] for col in schema.CANDIDATES.names}
        for start in range(0, len(rows), s.batch_prompts):
            batch, batch_images = rows[start: start + s.batch_prompts], images[start: start + s.batch_prompts]
            seed = batch_seed(c.seed * 1000 + r, [p["prompt_id"] for p in batch])
            if c.n_normal:
                params = SamplingParams(n=c.n_normal, temperature=s.temperature, top_p=s.top_p,
                                        max_new_tokens=s.max_new_tokens)
                with device_slot():
                    cands = sampler.sample(batch_images, [p["instruction"] for p in batch], params, seed)
                for p, row in zip(batch, cands):
                    for j, cand in enumerate(row):
                        schema.add_candidate(out, p["prompt_id"], j, cand, sampler.name, "")
            if c.n_contrastive:
                jobs = [(i, k, *perturb.draw(c.seed * 1000 + r, p["prompt_id"], k))
                        for i, p in enumerate(batch) for k in range(c.n_contrastive)]
                one = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)
                with device_slot():
                    cands = sampler.sample([perturb.perturb(batch_images[i], kind, ps) for i, _, kind, ps in jobs],
                                           [batch[i]["instruction"] for i, *_ in jobs], one,
                                           batch_seed(c.seed * 1000 + r + CONTRASTIVE_SEED, [p["prompt_id"] for p in batch]))
                for (i, k, kind, _), (cand,) in zip(jobs, cands):
                    schema.add_candidate(out, batch[i]["prompt_id"], c.n_normal + k, cand, sampler.name, kind)
        by_id = {p["prompt_id"]: (p, img) for p, img in zip(rows, images)}
        responses = [{"prompt_id": pid, "resp_idx": idx, "origin": "contrastive" if pert else "normal",
                      "perturbation": pert, "parent_idx": -1, "feedback": "", "text": text, "token_ids": ids}
                     for pid, idx, pert, text, ids in zip(out["prompt_id"], out["cand_idx"], out["perturbation"],
                                                          out["text"], out["token_ids"])]

        def item(resp: dict[str, Any]) -> ipa.Item:
            p, img = by_id[resp["prompt_id"]]
            return ipa.Item(resp["prompt_id"], img, p["instruction"], resp["text"], p.get("reference") or "",
                            p.get("scene"))

        if c.revise and responses:
            reviser = make_reviser(cfg, store, model_ref, generator_rel)
            with_reference = r >= c.reference_feedback_from_round
            items = [item(x) for x in responses]
            with device_slot():
                feedbacks = reviser.feedback(items, with_reference)
                refined = reviser.refine(items, feedbacks, with_reference)
            processor = processor_for(cfg, store, model_ref)
            per_prompt = c.n_normal + c.n_contrastive
            # under the device lock: a fast tokenizer keeps its padding settings in shared state, and
            # another shard's sampling pads with the same tokenizer
            with device_slot():
                revised_ids = [completion_ids(processor, text.strip(), add_eos=True) for text in refined]
            for x, fb, text, ids in zip(list(responses), feedbacks, refined, revised_ids):
                responses.append({"prompt_id": x["prompt_id"], "resp_idx": per_prompt + x["resp_idx"],
                                  "origin": "revised", "perturbation": "", "parent_idx": x["resp_idx"],
                                  "feedback": fb, "text": text.strip(), "token_ids": ids})
        verdicts = make_verifier(cfg).verify([item(x) for x in responses])
        for x, v in zip(responses, verdicts):
            for cond in ipa.CONDITIONS:
                x[cond] = getattr(v, cond) if v is not None else None
            x["verified"] = v.verified if v is not None else None
        return pa.Table.from_pylist(responses, schema.IPA_RESPONSES)

    return run_shard(store, stage, shard, key, compute, schema.IPA_RESPONSES, lease_seconds=cfg.execution.lease_seconds)


# ------------------------------------------------------------------ a round's pairs, all pairs

def collect_round(cfg: RunConfig, store: RunStore, r: int, n_shards: int, model_ref: str) -> dict[str, Any]:
    """Round r's pairs, feedback pairs and statistics (`summary.json`, with the unresolved prompts)."""
    from m3po_core.models import completion_ids

    stage = f"{_round(r)}/responses"
    key = stage_key(cfg, "ipa", "collect", r, [store.shard_entry(stage, i)["sha256"] for i in range(n_shards)])
    if (record := done_record(store, f"{_round(r)}/summary.json", key)) is not None:
        return record
    responses = store.read_stage(stage, n_shards).to_pylist() if n_shards else []
    pairs, fb_pairs, stats = ipa.round_pairs(responses, cfg.ipa.seed, r)
    prompts = {p["prompt_id"]: p for i in range(n_shards)
               for p in store.read_shard(f"{_round(r)}/prompts", i).to_pylist()}
    nan = float("nan")

    def row(pid: str, instruction: str, chosen: dict, rejected: dict, texts=("text", "text"), ids=None) -> dict:
        return {"prompt_id": pid, "image": prompts[pid]["image"], "instruction": instruction,
                "chosen": chosen[texts[0]], "rejected": rejected[texts[1]],
                "chosen_idx": chosen["resp_idx"], "rejected_idx": rejected["resp_idx"],
                "chosen_token_ids": ids[0] if ids else chosen["token_ids"],
                "rejected_token_ids": ids[1] if ids else rejected["token_ids"],
                "mas_chosen": nan, "mas_rejected": nan, "logp_chosen": nan, "logp_rejected": nan,
                "m3p_score": nan, "strategy": f"ipa-round-{r}"}

    store.write_table(f"{_round(r)}/pairs.parquet", pa.Table.from_pylist(
        [row(p["prompt_id"], prompts[p["prompt_id"]]["instruction"], p["chosen"], p["rejected"]) for p in pairs],
        schema.PAIRS), schema.PAIRS)
    fb_rows = []
    if fb_pairs and cfg.ipa.reviser == "policy":  # feedback pairs train the reviser only when it is the policy
        processor = processor_for(cfg, store, model_ref)
        by_key = {(x["prompt_id"], x["resp_idx"]): x for x in responses}
        for p in fb_pairs:
            parent = by_key[(p["prompt_id"], p["chosen"]["parent_idx"])]
            instruction = ipa.FEEDBACK_PROMPT.format(
                instruction=prompts[p["prompt_id"]]["instruction"], response=parent["text"],
                reference=ipa.REFERENCE_LINE.format(reference=prompts[p["prompt_id"]].get("reference") or "")
                if r >= cfg.ipa.reference_feedback_from_round else "")
            with device_slot():
                ids = (completion_ids(processor, p["chosen"]["feedback"], True),
                       completion_ids(processor, p["rejected"]["feedback"], True))
            fb_rows.append(row(p["prompt_id"], instruction, p["chosen"], p["rejected"], ("feedback", "feedback"), ids))
    store.write_table(f"{_round(r)}/feedback_pairs.parquet", pa.Table.from_pylist(fb_rows, schema.PAIRS), schema.PAIRS)
    record = {"key": key, **stats}
    store.write_json(f"{_round(r)}/summary.json", record)
    log.info("IPA round %d: %d prompts, %d pairs, %d all verified, %d unresolved", r, stats["prompts"],
             stats["pairs"], stats["all_verified"], len(stats["unresolved"]))
    return record


def finalize(cfg: RunConfig, store: RunStore, rounds_run: int) -> dict[str, Any]:
    """pairs.parquet and pairs_stats.json from every round: M3PO's train/evaluate/report read them."""
    summaries = [store.read_json(f"{_round(r)}/summary.json") for r in range(1, rounds_run + 1)]
    key = stage_key(cfg, "ipa", "pairs", [s["key"] for s in summaries])
    if (record := done_record(store, "pairs_stats.json", key)) is not None and store.exists("pairs.parquet"):
        return record
    tables = [store.read_table(f"{_round(r)}/pairs.parquet") for r in range(1, rounds_run + 1)]
    pairs = pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema.PAIRS)
    info = store.write_table("pairs.parquet", pairs, schema.PAIRS, row_group_size=schema.PAIRS_ROW_GROUP)
    first = summaries[0] if summaries else {"prompts": 0}
    last_unresolved = len(summaries[-1]["unresolved"]) if summaries else 0
    record = {"key": key, "groups": first["prompts"], "pairs": pairs.num_rows, "sha256": info["sha256"],
              "skipped_too_few": 0, "skipped_no_mas_gap": 0, "strategy": "ipa", "alpha": float("nan"),
              "delta": float("nan"), "logp": None, "mean_mas_gap": float("nan"), "mean_logp_gap": float("nan"),
              "unresolved_after_last_round": last_unresolved,
              "ipa_rounds": [{k: (len(v) if k == "unresolved" else v) for k, v in s.items() if k != "key"}
                             for s in summaries]}
    store.write_json("pairs_stats.json", record)
    return record
