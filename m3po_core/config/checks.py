"""Checks of a loaded configuration: value ranges and rules across sections, each naming the key at fault.

`validate` runs on every load (loading.py); `check_ipa` only when IPA runs, as M3PO runs ignore the
ipa section. Limit: they check the configuration alone, not whether the files, servers, models or
deployments it names exist or answer: the stages find that out when they use them.
"""
from __future__ import annotations

from m3po_core.config.sections import BENCHMARKS, PUBLIC_BENCHMARKS, RunConfig, TrainingConfig
from m3po_core.errors import ConfigError


def validate(cfg: RunConfig) -> RunConfig:
    """Checks across sections and of value ranges, each naming the key at fault."""
    positive = {"sampling.n": cfg.sampling.n, "sampling.max_new_tokens": cfg.sampling.max_new_tokens,
                "sampling.batch_prompts": cfg.sampling.batch_prompts, "data.shard_size": cfg.data.shard_size,
                "training.batch_size": cfg.training.batch_size, "evaluation.batch_size": cfg.evaluation.batch_size,
                "training.num_processes": cfg.training.num_processes, "evaluation.shard_size": cfg.evaluation.shard_size,
                "execution.shards_per_run": cfg.execution.shards_per_run, "sampling.round_size": cfg.sampling.round_size,
                "sampling.settle_rounds": cfg.sampling.settle_rounds}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"configuration key '{key}': must be >= 1, got {value}")
    for key in ("cooccurrence", "answer_bias"):
        if not 0 <= getattr(cfg.data.world, key) <= 1:
            raise ConfigError(f"configuration key 'data.world.{key}': a probability in [0, 1], "
                              f"got {getattr(cfg.data.world, key)}")
    if cfg.sampling.temperature <= 0 or not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError("configuration keys 'sampling.temperature' (> 0) and 'sampling.top_p' (0, 1]: "
                          f"got {cfg.sampling.temperature}, {cfg.sampling.top_p}")
    check_adaptive(cfg)
    if cfg.selection.alpha < 0 or cfg.selection.delta < 0:
        raise ConfigError("configuration keys 'selection.alpha' and 'selection.delta' must be >= 0")
    if cfg.scoring.judge != "reference" and not cfg.scoring.judge.startswith("openai:"):
        raise ConfigError(f"configuration key 'scoring.judge': {cfg.scoring.judge!r} is neither 'reference' "
                          "nor 'openai:<model>'")
    if "openai" in (cfg.sampling.backend, cfg.evaluation.backend) and not cfg.sampling.base_url:
        raise ConfigError("configuration key 'sampling.base_url': the openai sampling backend needs the "
                          "server's URL (e.g. http://host:8000/v1)")
    ipa = cfg.ipa
    for key, name in (("reviser", ipa.reviser), ("verifier", ipa.verifier)):
        allowed = ("reference", "policy") if key == "reviser" else ("reference",)
        if name not in allowed and not name.startswith("openai:"):
            raise ConfigError(f"configuration key 'ipa.{key}': {name!r} is none of {list(allowed)} or 'openai:<model>'")
    if ipa.n_normal + ipa.n_contrastive < 1:
        raise ConfigError("configuration keys 'ipa.n_normal' + 'ipa.n_contrastive': at least one sample per prompt")
    for i, spec in enumerate(cfg.scoring.extra_judges):
        if not spec.judge.startswith("openai:"):
            raise ConfigError(f"configuration key 'scoring.extra_judges[{i}].judge': {spec.judge!r} is not "
                              "'openai:<model>'")
    if cfg.scoring.clip_mapping not in ("auto", "clipscore", "affine"):
        raise ConfigError(f"configuration key 'scoring.clip_mapping': {cfg.scoring.clip_mapping!r} is not one of "
                          "auto, clipscore, affine")
    for i, spec in enumerate(cfg.scoring.extra_encoders):
        if spec.name == "m3po-tiny-clip":
            raise ConfigError(f"configuration key 'scoring.extra_encoders[{i}].name': the tiny CLIP is built for "
                              "scoring.clip only; name a pretrained encoder")
    if cfg.data.source != "synthetic" and cfg.scoring.judge == "reference":
        raise ConfigError("configuration key 'scoring.judge': the reference judge needs the synthetic world's "
                          f"scene graphs; data.source={cfg.data.source!r} needs a model judge")
    t = cfg.training
    if "vllm" in (cfg.sampling.backend, cfg.evaluation.backend) and t.lora_r > 512:
        raise ConfigError(f"configuration key 'training.lora_r': vLLM serves LoRA ranks up to 512, got {t.lora_r}")
    batch_split(t)
    if t.pair_memory_gib is not None and t.pair_memory_gib <= 0:
        raise ConfigError(f"configuration key 'training.pair_memory_gib': GiB > 0 (or null), got {t.pair_memory_gib}")
    if t.deepspeed_zero not in (None, 2, 3):
        raise ConfigError(f"configuration key 'training.deepspeed_zero': 2 or 3 (or null), got {t.deepspeed_zero}")
    if t.max_length is not None and t.max_length < 1:
        raise ConfigError(f"configuration key 'training.max_length': a number of tokens >= 1 (or null: the "
                          f"model's context length), got {t.max_length}")
    if t.overlong_pairs not in ("refuse", "drop"):  # loading checks the Literal; this sees a RunConfig built in Python
        raise ConfigError(f"configuration key 'training.overlong_pairs': 'refuse' or 'drop', got {t.overlong_pairs!r}")
    if t.deepspeed_zero and t.num_processes < 2:
        raise ConfigError("configuration key 'training.deepspeed_zero': DeepSpeed runs under accelerate launch; "
                          "set training.num_processes to the number of GPUs (>= 2)")
    if cfg.evaluation.adapter_check_probes < 0 or cfg.evaluation.adapter_check_min_change < 0:
        raise ConfigError("configuration keys 'evaluation.adapter_check_probes' and "
                          "'evaluation.adapter_check_min_change' must be >= 0 (probes 0: no check), got "
                          f"{cfg.evaluation.adapter_check_probes}, {cfg.evaluation.adapter_check_min_change}")
    unknown = [b for b in cfg.evaluation.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"configuration key 'evaluation.benchmarks': unknown {unknown}; available: "
                          + ", ".join(BENCHMARKS))
    for bench, what in (("preference", "the simulated preference test has prompts"),
                        ("chair", "the CHAIR-style test has object annotations")):
        if cfg.data.source != "synthetic" and bench in cfg.evaluation.benchmarks:
            raise ConfigError(f"configuration key 'evaluation.benchmarks': {what} on the synthetic world only so far; "
                              f"drop '{bench}' for other data")
    for bench in PUBLIC_BENCHMARKS:
        if bench in cfg.evaluation.benchmarks and cfg.data.source != "synthetic" and getattr(cfg.evaluation, f"{bench}_path") is None:
            raise ConfigError(f"configuration key 'evaluation.{bench}_path': data.source={cfg.data.source!r} has no "
                              f"synthetic {bench} set; point it at the "
                              + ("public release's Parquet files" if bench != "ift" else "IFT Parquet (m3po make-ift)"))
    return cfg


def batch_split(t: TrainingConfig) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) with per-device x num_processes x steps ==
    batch_size, the global batch. training.per_device_batch_size None: batch_size / num_processes, one step
    (auto, before the device decides it: the same; m3po_core/train_memory.resolve gives the real split)."""
    if t.per_device_batch_size is None or t.per_device_batch_size == "auto":  # auto: decided on the device
        if t.batch_size % t.num_processes:
            raise ConfigError(f"configuration key 'training.batch_size': the global batch {t.batch_size} does not "
                              f"split over training.num_processes={t.num_processes} processes")
        return t.batch_size // t.num_processes, 1
    per_step = t.per_device_batch_size * t.num_processes   # pairs per micro-batch over all processes
    if t.per_device_batch_size < 1 or t.batch_size % per_step:
        raise ConfigError(
            "configuration keys 'training.batch_size', 'training.per_device_batch_size', 'training.num_processes': "
            f"the global batch {t.batch_size} is not a whole number of micro-batches of {t.per_device_batch_size} "
            f"pair(s) on each of {t.num_processes} process(es); set a per-device batch >= 1 that divides "
            f"batch_size / num_processes")
    return t.per_device_batch_size, t.batch_size // per_step


def check_adaptive(cfg: RunConfig) -> None:
    """Adaptive sampling and the judge budget."""
    s, sc = cfg.sampling, cfg.scoring
    if s.adaptive and s.seeding == "batch":
        raise ConfigError("configuration key 'sampling.seeding': adaptive sampling needs per-candidate seeds "
                          "('candidate' or 'auto'), got 'batch'")
    if s.adaptive and s.contrastive_n:
        raise ConfigError("configuration key 'sampling.contrastive_n': not supported with sampling.adaptive "
                          f"(got {s.contrastive_n}); set one of them off")
    if not 0 <= s.settle_gap <= 1:
        raise ConfigError(f"configuration key 'sampling.settle_gap': a MAS gap in [0, 1], got {s.settle_gap}")
    if sc.max_judge_requests is not None and sc.max_judge_requests < 0:
        raise ConfigError(f"configuration key 'scoring.max_judge_requests': must be >= 0, got {sc.max_judge_requests}")
    if sc.max_judge_cost is not None:
        if sc.max_judge_cost < 0:
            raise ConfigError(f"configuration key 'scoring.max_judge_cost': must be >= 0, got {sc.max_judge_cost}")
        if sc.judge_price_per_1k_input is None or sc.judge_price_per_1k_output is None:
            raise ConfigError("configuration key 'scoring.max_judge_cost': a cost budget needs both "
                              "'scoring.judge_price_per_1k_input' and 'scoring.judge_price_per_1k_output'")


def check_ipa(cfg: RunConfig) -> None:
    """What IPA needs beyond `validate` (checked when IPA runs: M3PO runs ignore the ipa section)."""
    for key in ("reviser", "verifier"):
        if getattr(cfg.ipa, key) == "reference" and cfg.data.source != "synthetic":
            raise ConfigError(f"configuration key 'ipa.{key}': the reference {key} needs the synthetic world's scene "
                              f"graphs; data.source={cfg.data.source!r} needs a model ({key}: openai:<model>)")
