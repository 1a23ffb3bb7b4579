"""The run's typed configuration: one dataclass per stage, loaded from YAML, strictly checked.

Defaults are the paper's (sections 3.2-3.6, 4.1) where it gives one; `configs/demo.yaml` states
where the embedded demo departs from them and why. Every stage's cache key contains that stage's
section (see `stage_config`), so changing a setting recomputes exactly the stages it decides.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from m3po_core.data.quality import QualityFilterConfig
from m3po_core.errors import ConfigError

BENCHMARKS = ("pope", "mme", "ift", "preference")
PUBLIC_BENCHMARKS = ("pope", "mme", "ift")  # read from `evaluation.{name}_path` on real data


@dataclass
class WorldConfig:
    """The synthetic image world (the demo's data); scene counts per split."""

    n_sft_scenes: int = 600        # warm start of the tiny base model
    n_train_scenes: int = 240      # M3PO prompts come from these
    n_eval_scenes: int = 80        # held out: POPE- and MME-style benchmarks
    prompts_per_scene: int = 2
    image_size: int = 64


@dataclass
class DataSourceConfig:
    """One more instruction file, in LLaVA's conversation JSON (m3po_core/data/llava_instruct.py)."""

    source: Literal["llava_instruct", "sharegpt4v"]
    path: str
    image_root: str = ""
    turns: Literal["first", "all"] = "first"
    max_prompts: Optional[int] = None


@dataclass
class DataConfig:
    """Where the (image, instruction) prompts come from."""

    source: Literal["synthetic", "llava_instruct", "sharegpt4v"] = "synthetic"
    path: Optional[str] = None          # llava_instruct / sharegpt4v: the JSON file (local path or URL)
    image_root: Optional[str] = None    # the folder its image paths are relative to
    turns: Literal["first", "all"] = "first"
    max_prompts: Optional[int] = None
    # further files whose prompts are added to the first source's (the paper samples from both
    # LLaVA-Instruct-150K and ShareGPT4V)
    extra_sources: list[DataSourceConfig] = field(default_factory=list)
    # applied to instruction data, not to the synthetic world (m3po_core/data/quality.py)
    filter: QualityFilterConfig = field(default_factory=QualityFilterConfig)
    shard_size: int = 48                # prompts per sampling / scoring shard
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class ModelConfig:
    """The policy: `tiny-llava` (built offline, warm-started here) or a LLaVA checkpoint name/path."""

    name: str = "tiny-llava"
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Warm start of tiny-llava only: a short supervised run on the synthetic world's `sft` split
    # that makes a base policy which is partly right (its accuracy is measured and reported).
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_lr: float = 2e-3
    seed: int = 0


@dataclass
class SamplingConfig:
    """Candidate generation (paper 3.2: N = 32, nucleus sampling at moderate temperature)."""

    # transformers: HF generate in process (anywhere); vllm: vLLM's offline engine on the worker's
    # GPUs (pip install '.[vllm]'); openai: an OpenAI-compatible server (e.g. `vllm serve`)
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    n: int = 32
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 48
    batch_prompts: int = 8              # prompts per generate() call (each with n samples)
    # Contrastive sampling (IPA's, offered to M3PO): this many more candidates per prompt, each
    # sampled on a perturbed copy of the image (noise, blur or scaling, m3po_core/perturb.py). They
    # join the pool as possible rejected answers only; their log P is under the perturbed image.
    contrastive_n: int = 0
    seed: int = 0
    # backend "openai": an OpenAI-compatible server, e.g. `vllm serve llava-hf/llava-1.5-7b-hf`
    base_url: Optional[str] = None      # e.g. http://gpu-host:8000/v1
    served_model: Optional[str] = None  # the server's model name (default: model.name)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    concurrency: int = 8                # requests in flight
    # backend "vllm": engine settings (one engine per worker process)
    tensor_parallel_size: int = 1       # GPUs per engine (2 for 13B on 40 GB cards)
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = 4096


@dataclass
class ClipConfig:
    """The alignment encoder of MAS (m3po_core/scoring/clip.py `load_encoder`): `m3po-tiny-clip`
    (trained here), an open_clip name + tag/path, or BLIP-2 image-text matching (`blip2:NAME_OR_DIR`)."""

    name: str = "m3po-tiny-clip"
    pretrained: Optional[str] = None    # e.g. "openai" for ViT-L-14, or a checkpoint path
    train_steps: int = 300              # tiny CLIP only
    train_batch_size: int = 64
    batch_size: int = 256               # texts per encode batch when scoring


@dataclass
class JudgeSpec:
    """One more judge of an ensemble (`scoring.extra_judges`)."""

    judge: str                          # "openai:<model>"
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class EncoderSpec:
    """One more alignment encoder of an ensemble (`scoring.extra_encoders`)."""

    name: str                           # an open_clip name, a saved directory, or blip2:NAME_OR_DIR
    pretrained: Optional[str] = None


@dataclass
class ScoringConfig:
    """MAS = clip_weight * (cos + 1) / 2 + judge_weight * judge.overall  (paper 3.3, weights ours)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    # "reference" (the synthetic world's scene-graph judge) or "openai:<model>" (any OpenAI-compatible
    # vision model: OpenAI, or a vLLM-served open VLM at judge_base_url)
    judge: str = "reference"
    judge_base_url: Optional[str] = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    judge_candidates_per_call: int = 1        # >1: rate several candidates of a prompt in one request
    judge_concurrency: int = 8
    # prices per 1000 tokens (input, output), for the cost line of the report; unset: tokens only
    judge_price_per_1k_input: Optional[float] = None
    judge_price_per_1k_output: Optional[float] = None
    clip_weight: float = 0.2
    judge_weight: float = 0.8
    # Ensembles (m3po_core/scoring/ensemble.py): more judges rate every candidate and each aspect is
    # averaged over the judges that rated it; more encoders score it and their [0, 1] scores are
    # averaged (the `clip` column then holds that mean).
    extra_judges: list[JudgeSpec] = field(default_factory=list)
    extra_encoders: list[EncoderSpec] = field(default_factory=list)


@dataclass
class SelectionConfig:
    """Pair selection (paper eq. 1-3; alpha = 0.5, delta = 0.1 in 4.1)."""

    strategy: Literal["m3po", "mas_gap", "random", "rm_best_worst"] = "m3po"
    alpha: float = 0.5
    delta: float = 0.1
    # The paper does not say whether log P is summed or length-normalised. delta = 0.1 only bites
    # on a per-token scale, and a summed log P favours short answers as "confident": mean is default.
    logp: Literal["logp_mean", "logp_sum"] = "logp_mean"
    seed: int = 0                       # for the `random` strategy


@dataclass
class TrainingConfig:
    """LoRA-DPO through TRL (paper 3.6, 4.1: batch 8, lr 5e-5, warm-up 5 %, 1 epoch; beta not given)."""

    beta: float = 0.1
    # TRL loss types, summed with `loss_weights`. The paper's DPO is ["sigmoid"]; ["sigmoid", "sft"]
    # adds the chosen answers' NLL (RPO), which keeps a small policy from drifting off its samples.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[list[float]] = None
    learning_rate: float = 5e-5
    batch_size: int = 8
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    seed: int = 0
    # Data-parallel training: with more than one process the train stage runs TRL under
    # `accelerate launch` (DDP, one process per GPU; on a CPU-only machine, gloo). `batch_size`
    # stays the global batch (per-device batch = batch_size / num_processes).
    num_processes: int = 1
    deepspeed_zero: Optional[int] = None    # 2 or 3: DeepSpeed ZeRO stage instead of plain DDP (GPUs)


@dataclass
class EvaluationConfig:
    """Held-out benchmarks, greedy decoding, base model against trained adapter."""

    # pope, mme; ift: the instruction-following test (constraints checked by rule and by the judge,
    # m3po_core/evaluation/ift.py); preference: the judge's 1-5 ratings and win rate against the base
    # (paper table 4)
    benchmarks: list[str] = field(default_factory=lambda: ["pope", "mme", "ift", "preference"])
    max_new_tokens: int = 24            # short answers (POPE, MME)
    open_max_new_tokens: Optional[int] = None  # open-ended answers (IFT, preference); None: max_new_tokens
    batch_size: int = 32
    shard_size: int = 256               # questions per cached predictions shard (an evaluation resumes per shard)
    # The public releases (Parquet: question_id, question, answer, image, category; a file, a
    # directory or a glob, local or s3://). Unset: the synthetic world's held-out versions.
    pope_path: Optional[str] = None
    mme_path: Optional[str] = None
    # IFT questions (Parquet: question_id, question, image, category, constraints, answer; see
    # `m3po make-ift`). Unset: the synthetic world's IFT.
    ift_path: Optional[str] = None
    # How the models answer: None = the sampling backend. transformers: in process, the adapter
    # merged into the base weights; vllm: the offline engine with the adapter as a LoRARequest;
    # openai: the sampling server, the trained model under `served_adapter` (vllm serve --enable-lora
    # --lora-modules NAME=ADAPTER_DIR), else loaded at run time through vLLM's /v1/load_lora_adapter
    # (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the server must see the adapter directory's path).
    backend: Optional[Literal["transformers", "vllm", "openai"]] = None
    served_adapter: Optional[str] = None
    # appended to public questions, as LLaVA-1.5's evaluation does
    answer_suffix: str = "\nAnswer the question using a single word or phrase."


@dataclass
class ExecutionConfig:
    """Where the sampling and scoring shards run. Not part of any cache key: it changes where
    shards are computed, not what they hold."""

    # in_process: tasks of the parent flow run (the embedded default); deployment: one flow run
    # per shard of the shard deployments, on their work pool (see deployments/prefect.yaml);
    # task_worker: one background task run per shard, taken by long-lived `m3po worker` processes
    # that keep their models loaded across shards; ray: tasks on a Ray cluster through
    # prefect-ray's task runner (`pip install '.[ray]'`), `ray_gpus_per_shard` GPUs each
    shards: Literal["in_process", "deployment", "task_worker", "ray"] = "in_process"
    sample_deployment: str = "m3po-sample-shard/m3po-sample-shard"
    score_deployment: str = "m3po-score-shard/m3po-score-shard"
    poll_seconds: float = 2.0
    # deployment / task_worker: a shard with no final state this long after the stage submitted its
    # shards fails the stage (its worker died, or none runs); size it for the whole stage. None: wait
    shard_timeout_seconds: Optional[float] = None
    gpu_concurrency_limit: str = "m3po-gpu"   # global concurrency limit each shard flow run holds
    ray_address: Optional[str] = None         # None: a local Ray instance; "auto" or "ray://head:10001": a cluster
    ray_gpus_per_shard: float = 1.0           # Ray's num_gpus per shard task (0 on a CPU-only cluster)


@dataclass
class IPAConfig:
    """IPA, the second method (ipa-arxiv-2503.20309; m3po_core/ipa.py): pairs of a verified response
    against a failed one, collected in rounds. The paper gives no sample counts; these are ours."""

    rounds: int = 3
    n_normal: int = 4                   # samples per prompt and round on the clean image
    n_contrastive: int = 4              # samples on a perturbed image (noise / blur / scaling, one drawn per sample)
    revise: bool = True                 # reflective revision: feedback on each sample, then a refined response
    # the reviser: "reference" (the synthetic world's simulated reviser), "policy" (the generator
    # itself, through the sampling backend) or "openai:<model>" (any OpenAI-compatible VLM)
    reviser: str = "reference"
    reviser_base_url: Optional[str] = None
    # the verifier: "reference" (the synthetic world's scene graphs) or "openai:<model>"
    verifier: str = "reference"
    verifier_base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # for an openai reviser / verifier; never stored
    concurrency: int = 8
    max_new_tokens: int = 64            # feedback and refined responses
    reference_feedback_from_round: int = 3  # the reference answer joins the feedback step from this round
    self_evolve: bool = True            # rounds >= 2 sample from the generator DPO-trained on the earlier pairs
    fix_rate: float = 0.5               # reference reviser only: chance a refinement fixes the answer
    reference_fix_rate: float = 0.8     # ... with the reference answer in the feedback step
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "m3po"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    ipa: IPAConfig = field(default_factory=IPAConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The repository's configs/ (the package is installed editable, see README and docker/).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


# ---------------------------------------------------------------------------------------------
# Loading and checking


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"configuration key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"configuration key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"configuration key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `5e-5` (no dot) as a string: YAML 1.1's float rule
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"configuration key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"configuration key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"configuration key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"configuration key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported configuration type {tp!r} at {key}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown configuration key '{where}' (known here: {', '.join(sorted(known))})")
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"configuration key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML, so `3`, `0.5`, `true`, `[x, y]` get their types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"configuration file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"configuration file {path}: top level must be a mapping")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    return validate(_build(RunConfig, tree))


def validate(cfg: RunConfig) -> RunConfig:
    """Checks across sections and of value ranges, each naming the key at fault."""
    positive = {"sampling.n": cfg.sampling.n, "sampling.max_new_tokens": cfg.sampling.max_new_tokens,
                "sampling.batch_prompts": cfg.sampling.batch_prompts, "data.shard_size": cfg.data.shard_size,
                "training.batch_size": cfg.training.batch_size, "evaluation.batch_size": cfg.evaluation.batch_size,
                "training.num_processes": cfg.training.num_processes, "evaluation.shard_size": cfg.evaluation.shard_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"configuration key '{key}': must be >= 1, got {value}")
    if cfg.sampling.temperature <= 0 or not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError("configuration keys 'sampling.temperature' (> 0) and 'sampling.top_p' (0, 1]: "
                          f"got {cfg.sampling.temperature}, {cfg.sampling.top_p}")
    if cfg.selection.alpha < 0 or cfg.selection.delta < 0:
        raise ConfigError(f"configuration keys 'selection.alpha' and 'selection.delta' must be >= 0")
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
    if t.batch_size % t.num_processes:
        raise ConfigError(f"configuration key 'training.batch_size': the global batch {t.batch_size} does not "
                          f"split over training.num_processes={t.num_processes} processes")
    if t.deepspeed_zero not in (None, 2, 3):
        raise ConfigError(f"configuration key 'training.deepspeed_zero': 2 or 3 (or null), got {t.deepspeed_zero}")
    if t.deepspeed_zero and t.num_processes < 2:
        raise ConfigError("configuration key 'training.deepspeed_zero': DeepSpeed runs under accelerate launch; "
                          "set training.num_processes to the number of GPUs (>= 2)")
    unknown = [b for b in cfg.evaluation.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"configuration key 'evaluation.benchmarks': unknown {unknown}; available: "
                          + ", ".join(BENCHMARKS))
    if cfg.data.source != "synthetic" and "preference" in cfg.evaluation.benchmarks:
        raise ConfigError("configuration key 'evaluation.benchmarks': the simulated preference test has prompts on "
                          "the synthetic world only so far; drop 'preference' for other data")
    for bench in PUBLIC_BENCHMARKS:
        if bench in cfg.evaluation.benchmarks and cfg.data.source != "synthetic" and getattr(cfg.evaluation, f"{bench}_path") is None:
            raise ConfigError(f"configuration key 'evaluation.{bench}_path': data.source={cfg.data.source!r} has no "
                              f"synthetic {bench} set; point it at the "
                              + ("public release's Parquet files" if bench != "ift" else "IFT Parquet (m3po make-ift)"))
    return cfg


def check_ipa(cfg: RunConfig) -> None:
    """What IPA needs beyond `validate` (checked when IPA runs: M3PO runs ignore the ipa section)."""
    for key in ("reviser", "verifier"):
        if getattr(cfg.ipa, key) == "reference" and cfg.data.source != "synthetic":
            raise ConfigError(f"configuration key 'ipa.{key}': the reference {key} needs the synthetic world's scene "
                              f"graphs; data.source={cfg.data.source!r} needs a model ({key}: openai:<model>)")


def fingerprint(obj: Any) -> str:
    """Short stable hash of any JSON-able value (dataclasses included)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _without(section: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A section minus settings that change how fast, not what (concurrency, batch sizes, key names)."""
    return {k: v for k, v in section.items() if k not in keys}


def _selection_key(sel: dict[str, Any]) -> dict[str, Any]:
    """Only the selection settings the strategy reads."""
    if sel["strategy"] in ("mas_gap", "rm_best_worst"):
        return _without(sel, "alpha", "delta", "seed")  # alpha = 0 (so delta plays no part); no randomness
    if sel["strategy"] == "m3po":
        return _without(sel, "seed")
    return sel


def stage_config(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the configuration that decides a stage's output: what goes into its cache key."""
    d = cfg.to_dict()
    world = d["data"]["world"]
    sections = {
        "prompts": {"seed": d["seed"], "data": d["data"]},
        # models built here depend on the warm-start split only, not on the prompt/eval split sizes
        "base_model": {"seed": d["seed"], "model": d["model"], "sft_scenes": world["n_sft_scenes"],
                       "image_size": world["image_size"]},
        "clip": {"seed": d["seed"], "clip": _without(d["scoring"]["clip"], "batch_size"), "sft_scenes": world["n_sft_scenes"],
                 "image_size": world["image_size"]},
        "candidates": {"sampling": _without(d["sampling"], "concurrency", "api_key_env", "tensor_parallel_size",
                                                   "gpu_memory_utilization"), "dtype": d["model"]["dtype"]},
        "scores": {"scoring": _without(d["scoring"], "judge_concurrency", "judge_api_key_env", "clip",
                                       "judge_price_per_1k_input", "judge_price_per_1k_output"),
                   "clip": _without(d["scoring"]["clip"], "batch_size")},
        "pairs": {"selection": _selection_key(d["selection"])},
        "ipa": {"ipa": _without(d["ipa"], "concurrency", "api_key_env"), "seed": d["seed"],
                "sampling": _without(d["sampling"], "concurrency", "api_key_env", "tensor_parallel_size",
                                     "gpu_memory_utilization", "n", "contrastive_n"),
                "dtype": d["model"]["dtype"]},
        "train": {"training": d["training"], "dtype": d["model"]["dtype"]},
        "evaluate": {"evaluation": d["evaluation"], "world": world, "seed": d["seed"],
                     # which backend and served model answered (the evaluation backend defaults to the sampler's)
                     "answerer": {"backend": d["evaluation"]["backend"] or d["sampling"]["backend"],
                                  "served_model": d["sampling"]["served_model"]},
                     # the preference test's ratings are the judge's
                     "judge": _without(d["scoring"], "judge_concurrency", "judge_api_key_env", "clip", "clip_weight",
                                       "judge_weight", "judge_price_per_1k_input", "judge_price_per_1k_output")
                     if {"preference", "ift"} & set(d["evaluation"]["benchmarks"]) else None},
    }
    return sections[stage]
