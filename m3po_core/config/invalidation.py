"""Which stages' output each configuration field decides: one line per field, and the stages' cache
keys are made of exactly those values (m3po_core/stages/runner.py `stage_config`). A field missing
here, or one named here that the configuration does not have, fails tests/test_config_stages.py, so
a new field cannot silently join or leave a key; `m3po config` prints each field's stages.

A field lists a stage when its value can change what that stage writes. NONE: it changes how fast,
where, or under which key name (concurrency, batch sizes of encoders, API key variables, prices
and budgets, the execution section), not what. Where a value matters only under another setting
(alpha with strategy mas_gap, the adaptive knobs without sampling.adaptive), it is listed anyway:
a key that changes needlessly recomputes; one that misses a change serves stale results.
Fields added after keys were first written are listed in INTRODUCED_AT with the value they came in
at: while a field holds it, it stays out of every key, so an option that changes nothing by default
recomputes nothing and the carried models keep their names.
Limit: a list of sections (data.extra_sources, scoring.extra_judges, scoring.extra_encoders) is one
field: its items' settings all go into the key, their key names and concurrency included.
"""
from __future__ import annotations

PROMPTS = "prompts"            # the prompt shards (and the held-out sets made from the same world)
BASE_MODEL = "base_model"      # the tiny base policy built here (warm start)
CLIP = "clip"                  # the tiny CLIP built here
CANDIDATES = "candidates"      # N samples per prompt
CANDIDATES_ROUND = "candidates_round"  # one round of adaptive sampling (shared by runs with another n)
SCORES = "scores"              # MAS per candidate
SCORES_ROUND = "scores_round"  # MAS of one adaptive round
PAIRS = "pairs"                # the selection
TRAIN = "train"                # the LoRA-DPO adapter (and IPA's generators)
EVALUATE = "evaluate"          # the benchmarks' answers and metrics
IPA = "ipa"                    # IPA's rounds

STAGES = (PROMPTS, BASE_MODEL, CLIP, CANDIDATES, CANDIDATES_ROUND, SCORES, SCORES_ROUND, PAIRS, TRAIN, EVALUATE, IPA)
NONE: tuple[str, ...] = ()
SAMPLED = (CANDIDATES, CANDIDATES_ROUND, IPA)         # what the policy's samples are
SCORED = (SCORES, SCORES_ROUND)
EVERY_SPLIT = (PROMPTS, BASE_MODEL, CLIP, EVALUATE)   # the world's images, every split's

FIELD_STAGES: dict[str, tuple[str, ...]] = {
    "name": NONE,
    "seed": (PROMPTS, BASE_MODEL, CLIP, EVALUATE, IPA),

    "data.source": (PROMPTS,),
    "data.path": (PROMPTS,),
    "data.image_root": (PROMPTS,),
    "data.turns": (PROMPTS,),
    "data.max_prompts": (PROMPTS,),
    "data.extra_sources": (PROMPTS,),
    "data.filter.enabled": (PROMPTS,),
    "data.filter.min_instruction_words": (PROMPTS,),
    "data.filter.max_instruction_words": (PROMPTS,),
    "data.filter.dedupe": (PROMPTS,),
    "data.filter.check_images": (PROMPTS,),
    "data.filter.image_threads": NONE,
    "data.shard_size": (PROMPTS,),
    "data.world.n_sft_scenes": EVERY_SPLIT,
    "data.world.n_train_scenes": (PROMPTS, EVALUATE),
    "data.world.n_eval_scenes": (PROMPTS, EVALUATE),
    "data.world.prompts_per_scene": (PROMPTS, EVALUATE),
    "data.world.open_per_scene": (PROMPTS, BASE_MODEL, EVALUATE),
    "data.world.explain": (PROMPTS, BASE_MODEL, EVALUATE),
    "data.world.image_size": EVERY_SPLIT,
    "data.world.cooccurrence": EVERY_SPLIT,
    "data.world.answer_bias": (PROMPTS, BASE_MODEL, EVALUATE),

    "model.name": (BASE_MODEL,),
    "model.device": (BASE_MODEL,),
    "model.dtype": (BASE_MODEL, *SAMPLED, TRAIN),
    "model.sft_steps": (BASE_MODEL,),
    "model.sft_batch_size": (BASE_MODEL,),
    "model.sft_lr": (BASE_MODEL,),
    "model.seed": (BASE_MODEL,),

    "sampling.backend": (*SAMPLED, EVALUATE),
    "sampling.n": (CANDIDATES,),
    "sampling.temperature": SAMPLED,
    "sampling.top_p": SAMPLED,
    "sampling.max_new_tokens": SAMPLED,
    "sampling.batch_prompts": SAMPLED,
    "sampling.contrastive_n": (CANDIDATES, CANDIDATES_ROUND),
    "sampling.seed": SAMPLED,
    "sampling.seeding": (CANDIDATES, CANDIDATES_ROUND),
    "sampling.adaptive": (CANDIDATES,),
    "sampling.round_size": (CANDIDATES, CANDIDATES_ROUND),
    "sampling.settle_gap": (CANDIDATES,),
    "sampling.settle_rounds": (CANDIDATES,),
    "sampling.base_url": SAMPLED,
    "sampling.served_model": (*SAMPLED, EVALUATE),
    "sampling.api_key_env": NONE,
    "sampling.concurrency": NONE,
    "sampling.tensor_parallel_size": NONE,
    "sampling.gpu_memory_utilization": NONE,
    "sampling.max_model_len": SAMPLED,

    "scoring.clip.name": (CLIP, *SCORED),
    "scoring.clip.pretrained": (CLIP, *SCORED),
    "scoring.clip.train_steps": (CLIP, *SCORED),
    "scoring.clip.train_batch_size": (CLIP, *SCORED),
    "scoring.clip.hard_negatives": (CLIP, *SCORED),
    "scoring.clip.batch_size": NONE,
    "scoring.judge": (*SCORED, EVALUATE),
    "scoring.judge_base_url": (*SCORED, EVALUATE),
    "scoring.judge_api_key_env": NONE,
    "scoring.judge_candidates_per_call": (*SCORED, EVALUATE),
    "scoring.judge_concurrency": NONE,
    "scoring.judge_price_per_1k_input": NONE,
    "scoring.judge_price_per_1k_output": NONE,
    "scoring.max_judge_requests": NONE,
    "scoring.max_judge_cost": NONE,
    "scoring.clip_weight": SCORED,
    "scoring.clip_mapping": SCORED,
    "scoring.judge_weight": SCORED,
    "scoring.extra_judges": (*SCORED, EVALUATE),
    "scoring.extra_encoders": SCORED,

    "selection.strategy": (PAIRS,),
    "selection.alpha": (PAIRS,),
    "selection.delta": (PAIRS,),
    "selection.logp": (PAIRS,),
    "selection.seed": (PAIRS,),

    "training.beta": (TRAIN,),
    "training.loss_type": (TRAIN,),
    "training.loss_weights": (TRAIN,),
    "training.learning_rate": (TRAIN,),
    "training.batch_size": (TRAIN,),
    "training.per_device_batch_size": (TRAIN,),
    "training.gradient_checkpointing": NONE,
    "training.pair_memory_gib": NONE,
    "training.warmup_ratio": (TRAIN,),
    "training.epochs": (TRAIN,),
    "training.lora_r": (TRAIN,),
    "training.lora_alpha": (TRAIN,),
    "training.lora_dropout": (TRAIN,),
    "training.lora_target_modules": (TRAIN,),
    "training.seed": (TRAIN,),
    "training.num_processes": (TRAIN,),
    "training.deepspeed_zero": (TRAIN,),
    "training.max_length": (TRAIN,),
    "training.overlong_pairs": (TRAIN,),

    "evaluation.benchmarks": (EVALUATE,),
    "evaluation.max_new_tokens": (EVALUATE,),
    "evaluation.open_max_new_tokens": (EVALUATE,),
    "evaluation.batch_size": (EVALUATE,),
    "evaluation.shard_size": (EVALUATE,),
    "evaluation.pope_path": (EVALUATE,),
    "evaluation.mme_path": (EVALUATE,),
    "evaluation.ift_path": (EVALUATE,),
    "evaluation.backend": (EVALUATE,),
    "evaluation.served_adapter": (EVALUATE,),
    "evaluation.adapter_check_probes": NONE,
    "evaluation.adapter_check_min_change": NONE,
    "evaluation.answer_suffix": (EVALUATE,),

    "execution.shards": NONE,
    "execution.sample_deployment": NONE,
    "execution.score_deployment": NONE,
    "execution.shards_per_run": NONE,
    "execution.poll_seconds": NONE,
    "execution.shard_timeout_seconds": NONE,
    "execution.lease_seconds": NONE,
    "execution.lease_resubmits": NONE,
    "execution.gpu_concurrency_limit": NONE,
    "execution.ray_address": NONE,
    "execution.ray_gpus_per_shard": NONE,

    "ipa.rounds": (IPA,),
    "ipa.n_normal": (IPA,),
    "ipa.n_contrastive": (IPA,),
    "ipa.revise": (IPA,),
    "ipa.reviser": (IPA,),
    "ipa.reviser_base_url": (IPA,),
    "ipa.verifier": (IPA,),
    "ipa.verifier_base_url": (IPA,),
    "ipa.api_key_env": NONE,
    "ipa.concurrency": NONE,
    "ipa.max_new_tokens": (IPA,),
    "ipa.reference_feedback_from_round": (IPA,),
    "ipa.self_evolve": (IPA,),
    "ipa.fix_rate": (IPA,),
    "ipa.reference_fix_rate": (IPA,),
    "ipa.seed": (IPA,),}


# Field -> the value it was introduced at (its default): left out of the keys while it holds it.
INTRODUCED_AT: dict[str, object] = {
    "data.world.explain": False,
}


def fields_of(stage: str) -> list[str]:
    """The fields whose values make up `stage`'s cache key, in the table's order."""
    if stage not in STAGES:
        raise KeyError(f"no stage {stage!r} (stages: {', '.join(STAGES)})")
    return [name for name, stages in FIELD_STAGES.items() if stage in stages]
