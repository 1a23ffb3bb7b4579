"""The configuration's sections: one dataclass per stage, each field with its type, default and help.

Every field states its meaning in `metadata["help"]`, as TRL's config dataclasses do; `m3po config
[SECTION]` prints them (describe.py). Limit: this module declares types, defaults and meanings only.
Values are checked against their types when loaded (loading.py) and across sections by `validate`
(checks.py); a dataclass built directly in Python is checked by neither.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from m3po_core.config.execution import ExecutionConfig
from m3po_core.data.quality import QualityFilterConfig

BENCHMARKS = ("pope", "mme", "ift", "preference", "chair")
PUBLIC_BENCHMARKS = ("pope", "mme", "ift")  # read from `evaluation.{name}_path` on real data


@dataclass
class WorldConfig:
    """The synthetic image world (the demo's data); scene counts per split."""

    n_sft_scenes: int = field(default=600, metadata={"help": "Scenes of the `sft` split: the warm start of the tiny "
                                                             "base model (and the tiny CLIP's training images)."})
    n_train_scenes: int = field(default=240, metadata={"help": "Scenes of the `train` split: M3PO prompts come from "
                                                               "these (prompts_per_scene each)."})
    n_eval_scenes: int = field(default=80, metadata={"help": "Scenes of the `eval` split, held out: POPE- and "
                                                             "MME-style benchmarks (and the synthetic IFT and "
                                                             "preference prompts)."})
    prompts_per_scene: int = field(default=2, metadata={"help": "Instructions per train scene: n_train_scenes x "
                                                                "prompts_per_scene M3PO prompts."})
    open_per_scene: int = field(default=0, metadata={
        "help": "Open-ended instructions per scene besides prompts_per_scene (list the objects, say where they are, "
                "describe in detail: synthetic.OPEN_KINDS), in the sft and train splits: answers a candidate can get "
                "partly right, graded by degree by the reference judge. 0: the short and yes/no kinds only."})
    explain: bool = field(default=False, metadata={
        "help": "Yes/no answers go on to say what the image shows, as LLaVA's do (synthetic.explained_answer), graded "
                "by degree by the reference judge; in the sft and train splits with the answer_bias of open answers."})
    image_size: int = field(default=64, metadata={"help": "Side of the rendered square scene images, in pixels."})
    cooccurrence: float = field(default=0.0, metadata={
        "help": "The world's co-occurrence statistics: the probability that a scene with room for another object "
                "holds the companion (synthetic.COMPANIONS) of one it holds, as forks come with knives. 0: objects "
                "independent (and no questions aimed at companions)."})
    answer_bias: float = field(default=0.0, metadata={
        "help": "Co-occurrence bias of the instruction data (the sft and train splits, never val/eval): the share of "
                "questions about an absent companion of a present object whose answer says it is there, as answers "
                "written from captions and co-occurrence priors do. 0: every answer true to the image."})


@dataclass
class DataSourceConfig:
    """One more instruction file, in LLaVA's conversation JSON (m3po_core/data/llava_instruct.py)."""

    source: Literal["llava_instruct", "sharegpt4v"] = field(metadata={
        "help": "The file's format: llava_instruct (LLaVA-Instruct-150K) or sharegpt4v (the same records; "
                "text-only records are skipped and counted, prompt ids are prefixed `sharegpt4v-`)."})
    path: str = field(metadata={"help": "The JSON file (local path or fsspec URL, e.g. s3://...)."})
    image_root: str = field(default="", metadata={"help": "The folder its image paths are relative to (empty: "
                                                          "the paths are used as they are)."})
    turns: Literal["first", "all"] = field(default="first", metadata={
        "help": "first: the first (human, gpt) turn pair of each conversation becomes a prompt; all: every pair."})
    max_prompts: Optional[int] = field(default=None, metadata={"help": "At most this many prompts from this file, "
                                                                      "in file order (None: all)."})


@dataclass
class DataConfig:
    """Where the (image, instruction) prompts come from."""

    source: Literal["synthetic", "llava_instruct", "sharegpt4v"] = field(default="synthetic", metadata={
        "help": "synthetic: the embedded image world (data.world); llava_instruct / sharegpt4v: an instruction "
                "file in LLaVA's conversation JSON (data.path, data.image_root), which needs a model judge."})
    path: Optional[str] = field(default=None, metadata={"help": "llava_instruct / sharegpt4v: the JSON file (local "
                                                                "path or URL)."})
    image_root: Optional[str] = field(default=None, metadata={"help": "The folder its image paths are relative to "
                                                                      "(llava_instruct / sharegpt4v: required)."})
    turns: Literal["first", "all"] = field(default="first", metadata={
        "help": "Instruction files: first keeps the first (human, gpt) turn pair of each conversation; all keeps "
                "every pair."})
    max_prompts: Optional[int] = field(default=None, metadata={
        "help": "At most this many prompts (None: all): of the first file, cut while loading (extra_sources have "
                "their own), or of the synthetic world's."})
    extra_sources: list[DataSourceConfig] = field(default_factory=list, metadata={
        "help": "Further files whose prompts are added to the first source's (the paper samples from both "
                "LLaVA-Instruct-150K and ShareGPT4V)."})
    filter: QualityFilterConfig = field(default_factory=QualityFilterConfig, metadata={
        "help": "The quality filter; applied to instruction data, not to the synthetic world "
                "(m3po_core/data/quality.py)."})
    shard_size: int = field(default=48, metadata={"help": "Prompts per sampling / scoring shard."})
    world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "The synthetic image world "
                                                                              "(data.source: synthetic)."})


@dataclass
class ModelConfig:
    """The policy: `tiny-llava` (built offline, warm-started here) or a LLaVA checkpoint name/path."""

    name: str = field(default="tiny-llava", metadata={
        "help": "tiny-llava (built offline and warm-started here) or a LLaVA checkpoint: a Hugging Face name "
                "(e.g. llava-hf/llava-1.5-7b-hf) or a path."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (auto: CUDA if available, "
                                                          "else the CPU)."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "The dtype the policy is loaded in (also the vLLM engine's)."})
    sft_steps: int = field(default=1000, metadata={
        "help": "Warm start of tiny-llava only: steps of a short supervised run on the synthetic world's `sft` "
                "split that makes a base policy which is partly right (its accuracy is measured and reported)."})
    sft_batch_size: int = field(default=32, metadata={"help": "Warm start of tiny-llava only: batch size."})
    sft_lr: float = field(default=2e-3, metadata={"help": "Warm start of tiny-llava only: learning rate."})
    seed: int = field(default=0, metadata={"help": "tiny-llava only: seed of its initial weights and its warm "
                                                   "start."})


@dataclass
class SamplingConfig:
    """Candidate generation (paper 3.2: N = 32, nucleus sampling at moderate temperature)."""

    backend: Literal["transformers", "vllm", "openai"] = field(default="transformers", metadata={
        "help": "transformers: HF generate in process (anywhere); vllm: vLLM's offline engine on the worker's "
                "GPUs (pip install '.[vllm]'); openai: an OpenAI-compatible server (e.g. `vllm serve`)."})
    n: int = field(default=32, metadata={"help": "Candidates sampled per prompt (paper 3.2: N = 32)."})
    temperature: float = field(default=0.9, metadata={
        "help": "Sampling temperature (paper 3.2: moderate; also IPA's sampling). Must be > 0."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling's top-p, in (0, 1] (paper 3.2; also "
                                                         "IPA's sampling)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens at most per candidate (also IPA's samples)."})
    batch_prompts: int = field(default=8, metadata={"help": "Prompts per generate() call (each with n samples)."})
    contrastive_n: int = field(default=0, metadata={
        "help": "Contrastive sampling (IPA's, offered to M3PO): this many more candidates per prompt, each sampled "
                "on a perturbed copy of the image (noise, blur or scaling, m3po_core/perturb.py). They join the pool "
                "as possible rejected answers only; their log P is under the perturbed image."})
    seed: int = field(default=0, metadata={
        "help": "Base seed of the candidates: each batch's seed derives from it and the batch's prompt ids, so a "
                "prompt gets the same samples however prompts are cut into shards (also draws the perturbations)."})
    seeding: Literal["auto", "batch", "candidate"] = field(default="auto", metadata={
        "help": "batch: one random stream per batch of prompts (the scheme the figures in README and docs/ were "
                "measured with); candidate: candidate j of a prompt is drawn with seed(prompt) + j alone, so its "
                "first k candidates are the same whether k or n are sampled, at once or in rounds; auto: candidate "
                "when adaptive, else batch."})
    adaptive: bool = field(default=False, metadata={
        "help": "Sample and score in rounds of round_size candidates per prompt and stop a prompt once its pair is "
                "settled (m3po_core/adaptive.py: a MAS gap of settle_gap with a confident rejected answer, or, after "
                "settle_rounds rounds, the gap alone or one answer repeated), up to n. The paper samples N = 32 "
                "for every prompt (dynamic candidate generation is its future work)."})
    round_size: int = field(default=8, metadata={"help": "adaptive: candidates per prompt and round (k)."})
    settle_gap: float = field(default=0.3, metadata={
        "help": "adaptive: the MAS gap of a settled pair (chosen on the demo's training prompts' pools, "
                "bench/adaptive_sampling.py; MAS lies in [0, 1])."})
    settle_rounds: int = field(default=2, metadata={
        "help": "adaptive: after this many rounds a pair with the gap is settled even when its rejected answer "
                "pays a confidence penalty, and a prompt whose answers are all alike (one MAS) stops."})
    base_url: Optional[str] = field(default=None, metadata={
        "help": "backend openai: the OpenAI-compatible server, e.g. `vllm serve llava-hf/llava-1.5-7b-hf`, at e.g. "
                "http://gpu-host:8000/v1 (also needed when evaluation.backend is openai)."})
    served_model: Optional[str] = field(default=None, metadata={"help": "backend openai: the server's model name "
                                                                         "(default: model.name)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "backend openai: the key is read from this variable, never stored (a server at base_url may need "
                "none)."})
    concurrency: int = field(default=8, metadata={"help": "backend openai: requests in flight."})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "backend vllm (one engine per worker process): GPUs per engine (2 for 13B on 40 GB cards)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "backend vllm: the share of each GPU's memory the engine reserves."})
    max_model_len: Optional[int] = field(default=4096, metadata={
        "help": "backend vllm: the engine's context length in tokens (None: the model's own)."})

    @property
    def per_candidate_seeds(self) -> bool:
        """`seeding` resolved: candidate j of a prompt drawn with its own seed (m3po_core/sampling)."""
        return self.seeding == "candidate" or (self.seeding == "auto" and self.adaptive)


@dataclass
class ClipConfig:
    """The alignment encoder of MAS (m3po_core/scoring/clip.py `load_encoder`): `m3po-tiny-clip`
    (trained here), an open_clip name + tag/path, or BLIP-2 image-text matching (`blip2:NAME_OR_DIR`)."""

    name: str = field(default="m3po-tiny-clip", metadata={
        "help": "m3po-tiny-clip (trained here on the synthetic world), an open_clip model name (e.g. ViT-L-14), "
                "a saved directory, or blip2:NAME_OR_DIR (BLIP-2 image-text matching)."})
    pretrained: Optional[str] = field(default=None, metadata={"help": "open_clip's pretrained tag or checkpoint: "
                                                                      "e.g. \"openai\" for ViT-L-14, or a path."})
    train_steps: int = field(default=300, metadata={"help": "Tiny CLIP only: training steps."})
    train_batch_size: int = field(default=64, metadata={"help": "Tiny CLIP only: training batch size."})
    hard_negatives: int = field(default=0, metadata={
        "help": "Tiny CLIP only: per training image, this many captions that get the scene wrong (an absent object "
                "added, its companion first; an object recoloured or misplaced), each trained to score below the "
                "true caption, so the similarity moves with what a caption gets right. 0: contrastive loss only."})
    batch_size: int = field(default=256, metadata={"help": "Texts per encode batch when scoring."})


@dataclass
class JudgeSpec:
    """One more judge of an ensemble (`scoring.extra_judges`)."""

    judge: str = field(metadata={"help": "\"openai:<model>\": any OpenAI-compatible vision model."})
    base_url: Optional[str] = field(default=None, metadata={"help": "Its server's URL (None: OpenAI's API)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "The key is read from this variable, "
                                                                         "never stored."})


@dataclass
class EncoderSpec:
    """One more alignment encoder of an ensemble (`scoring.extra_encoders`)."""

    name: str = field(metadata={"help": "An open_clip name, a saved directory, or blip2:NAME_OR_DIR (not "
                                        "m3po-tiny-clip)."})
    pretrained: Optional[str] = field(default=None, metadata={"help": "open_clip's pretrained tag or checkpoint "
                                                                      "path, as scoring.clip.pretrained."})


@dataclass
class ScoringConfig:
    """MAS = clip_weight * unit(cos) + judge_weight * judge.overall  (paper 3.3, weights ours); unit() is
    `clip_mapping`: CLIPScore for pretrained encoders, (cos + 1) / 2 for the tiny CLIP."""

    clip: ClipConfig = field(default_factory=ClipConfig, metadata={"help": "The alignment encoder of MAS."})
    judge: str = field(default="reference", metadata={
        "help": "\"reference\" (the synthetic world's scene-graph judge) or \"openai:<model>\" (any "
                "OpenAI-compatible vision model: OpenAI, or a vLLM-served open VLM at judge_base_url)."})
    judge_base_url: Optional[str] = field(default=None, metadata={"help": "An openai judge's server URL (None: "
                                                                          "OpenAI's API)."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "The key is read from this "
                                                                               "variable, never stored."})
    judge_candidates_per_call: int = field(default=1, metadata={"help": ">1: rate several candidates of a prompt "
                                                                        "in one request."})
    judge_concurrency: int = field(default=8, metadata={"help": "An openai judge's requests in flight."})
    judge_price_per_1k_input: Optional[float] = field(default=None, metadata={
        "help": "Price per 1000 input tokens, for the cost line of the report; unset: tokens only."})
    judge_price_per_1k_output: Optional[float] = field(default=None, metadata={
        "help": "Price per 1000 output tokens, for the cost line of the report; unset: tokens only."})
    max_judge_requests: Optional[int] = field(default=None, metadata={
        "help": "Judge budget: scoring stops sending requests once the run's judge requests reach this; what is "
                "left unrated is marked (`unrated_budget`) and a run with a larger budget rates it. The reference "
                "judge counts one request per rating. None: no limit."})
    max_judge_cost: Optional[float] = field(default=None, metadata={
        "help": "Judge budget in the prices' currency (needs both judge prices): as max_judge_requests, by cost. "
                "None: no limit."})
    clip_weight: float = field(default=0.2, metadata={"help": "MAS weight of the encoder's score in [0, 1] "
                                                              "(`clip_mapping`; paper 3.3, the value is ours)."})
    clip_mapping: str = field(default="auto", metadata={
        "help": "How a CLIP cosine becomes MAS's [0, 1] score: clipscore = min(max(2.5 * cos, 0), 1) (CLIPScore, "
                "Hessel et al. 2021; the field's convention for pretrained CLIP, whose image-text cosines sit in "
                "about 0.15-0.35, so (cos + 1) / 2 would move by hundredths), affine = (cos + 1) / 2, auto = "
                "clipscore for a pretrained encoder and affine for m3po-tiny-clip (trained here; its cosines span "
                "[-1, 1]). BLIP-2's match probability enters as it is."})
    judge_weight: float = field(default=0.8, metadata={"help": "MAS weight of the judge's overall rating (paper "
                                                               "3.3; the value is ours)."})
    extra_judges: list[JudgeSpec] = field(default_factory=list, metadata={
        "help": "Ensembles (m3po_core/scoring/ensemble.py): more judges rate every candidate and each aspect is "
                "averaged over the judges that rated it."})
    extra_encoders: list[EncoderSpec] = field(default_factory=list, metadata={
        "help": "Ensembles (m3po_core/scoring/ensemble.py): more encoders score every candidate and their [0, 1] "
                "scores are averaged (the `clip` column then holds that mean)."})

    def cosine_mapping(self, encoder: str) -> str:
        """`clip_mapping` for the encoder named `encoder`, "auto" resolved."""
        if self.clip_mapping != "auto":
            return self.clip_mapping
        return "affine" if encoder == "m3po-tiny-clip" else "clipscore"


@dataclass
class SelectionConfig:
    """Pair selection (paper eq. 1-3; alpha = 0.5, delta = 0.1 in 4.1)."""

    strategy: Literal["m3po", "mas_gap", "random", "rm_best_worst"] = field(default="m3po", metadata={
        "help": "m3po: eq. 1-3; mas_gap: alpha = 0, the paper's ablation (the lowest-MAS candidate); random: "
                "the best MAS against a worse one drawn uniformly (vanilla DPO); rm_best_worst: the best against "
                "the worst by the judge's rating alone (RM-DPO)."})
    alpha: float = field(default=0.5, metadata={
        "help": "Weight of the log P term in eq. 2 (paper 4.1: 0.5); >= 0. It decides the pairs of strategy m3po "
                "only (mas_gap and rm_best_worst select with alpha = 0)."})
    delta: float = field(default=0.1, metadata={
        "help": "Log P margin of eq. 2: a gap logP(R_w) - logP(R_j) up to delta costs nothing (paper 4.1: 0.1); "
                ">= 0; strategy m3po only."})
    logp: Literal["logp_mean", "logp_sum"] = field(default="logp_mean", metadata={
        "help": "The paper does not say whether log P is summed or length-normalised. delta = 0.1 only bites on "
                "a per-token scale, and a summed log P favours short answers as \"confident\": mean is default."})
    seed: int = field(default=0, metadata={"help": "For the `random` strategy."})


@dataclass
class TrainingConfig:
    """LoRA-DPO through TRL (paper 3.6, 4.1: batch 8, lr 5e-5, warm-up 5 %, 1 epoch; beta not given)."""

    beta: float = field(default=0.1, metadata={"help": "DPO's beta (TRL's default; the paper gives none)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "TRL loss types, summed with loss_weights. The paper's DPO is [sigmoid]; [sigmoid, sft] adds the "
                "chosen answers' NLL (RPO), which keeps a small policy from drifting off its samples."})
    loss_weights: Optional[list[float]] = field(default=None, metadata={
        "help": "One weight per loss_type, as many as there are (None: TRL's equal weights, 1.0 each)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate, linear schedule (paper 4.1: "
                                                                 "5e-5)."})
    batch_size: int = field(default=8, metadata={"help": "The global batch in pairs per optimizer step (paper 4.1: "
                                                         "8) = per_device_batch_size x num_processes x the gradient "
                                                         "accumulation steps derived from them."})
    per_device_batch_size: Union[int, Literal["auto"], None] = field(default=None, metadata={
        "help": "Pairs per device per forward/backward (each pair is two sequences, chosen and rejected). None: "
                "batch_size / num_processes, no gradient accumulation. Smaller: gradients are accumulated over "
                "batch_size / (per_device_batch_size x num_processes) micro-batches, which must be a whole number, "
                "so the global batch stays batch_size. auto: the largest that the card's free memory holds "
                "(m3po_core/train_memory.py; on a CPU, None's)."})
    gradient_checkpointing: Union[bool, Literal["auto"]] = field(default=False, metadata={
        "help": "Recompute each layer's activations in the backward pass instead of holding them (non-reentrant, "
                "as PEFT needs): about a third more compute for a fraction of the activation memory; what is "
                "learnt does not change. auto: off where at least 2 pairs a device fit without it, else on "
                "(m3po_core/train_memory.py; the LLaVA-1.5 configs)."})
    pair_memory_gib: Optional[float] = field(default=None, metadata={
        "help": "For the auto settings: GPU memory of one pair in training, in GiB, as bench/gpu_check.py measures "
                "it on your card. None: estimated from the model's shape and the longest pair (measured on an "
                "H200 at 7B shapes)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up share of all steps (paper 4.1: 5 %)."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs over the pairs (paper 4.1: 1)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (vLLM serves ranks up to 512)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA's alpha (its scaling is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout probability of the LoRA layers."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Projections of the language model that get adapters, as LLaVA's LoRA recipes do (the "
                          "vision tower's modules of the same names stay frozen)."})
    seed: int = field(default=0, metadata={"help": "TRL's training seed (adapter initialisation, data order)."})
    num_processes: int = field(default=1, metadata={
        "help": "Data-parallel training: with more than one process the train stage runs TRL under `accelerate "
                "launch` (DDP, one process per GPU; on a CPU-only machine, gloo). batch_size stays the global "
                "batch (see per_device_batch_size)."})
    deepspeed_zero: Optional[int] = field(default=None, metadata={
        "help": "2 or 3: DeepSpeed ZeRO stage instead of plain DDP (GPUs; needs num_processes >= 2)."})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Longest training sequence in tokens: a pair's prompt with its image tokens expanded + the longer "
                "of its two completions. The limit is min(max_length, the model's context length, read from the "
                "model config: the text config's max_position_embeddings); None: the model's context. Pairs "
                "over it are never cut (a cut splits the image tokens): see overlong_pairs."})
    overlong_pairs: Literal["refuse", "drop"] = field(default="refuse", metadata={
        "help": "Pairs longer than the limit (see max_length), checked before training. refuse: stop with an "
                "error naming them (row and prompt_id in the pairs file, first ten, their count and lengths); "
                "drop: leave them out, log how many, and record the count in train_log.json "
                "(dropped_overlong_pairs)."})


@dataclass
class EvaluationConfig:
    """Held-out benchmarks, greedy decoding, base model against trained adapter."""

    benchmarks: list[str] = field(default_factory=lambda: ["pope", "mme", "ift", "preference"], metadata={
        "help": "pope, mme; ift: the instruction-following test (constraints checked by rule and by the judge, "
                "m3po_core/evaluation/ift.py); preference: the judge's 1-5 ratings and win rate against the base "
                "(paper table 4); chair: object hallucination of detailed descriptions (CHAIR_s, CHAIR_i; synthetic "
                "world only, m3po_core/evaluation/chair.py)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Short answers (POPE, MME)."})
    open_max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "Open-ended answers (IFT, preference, CHAIR's descriptions); None: max_new_tokens."})
    batch_size: int = field(default=32, metadata={"help": "Questions per greedy generate batch (also the IPA "
                                                          "reviser's, when a model revises)."})
    shard_size: int = field(default=256, metadata={
        "help": "Questions per cached predictions shard (an evaluation resumes per shard)."})
    pope_path: Optional[str] = field(default=None, metadata={
        "help": "POPE's public release (Parquet: question_id, question, answer, image, category; a file, a "
                "directory or a glob, local or s3://). Unset: the synthetic world's held-out version."})
    mme_path: Optional[str] = field(default=None, metadata={
        "help": "MME's public release (Parquet: question_id, question, answer, image, category; a file, a "
                "directory or a glob, local or s3://). Unset: the synthetic world's held-out version."})
    ift_path: Optional[str] = field(default=None, metadata={
        "help": "IFT questions (Parquet: question_id, question, image, category, constraints, answer; see "
                "`m3po make-ift`). Unset: the synthetic world's IFT."})
    backend: Optional[Literal["transformers", "vllm", "openai"]] = field(default=None, metadata={
        "help": "How the models answer: None = the sampling backend. transformers: in process, the adapter merged "
                "into the base weights; vllm: the offline engine with the adapter as a LoRARequest; openai: the "
                "sampling server, the trained model under served_adapter (vllm serve --enable-lora --lora-modules "
                "NAME=ADAPTER_DIR), else loaded at run time through vLLM's /v1/load_lora_adapter "
                "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the server must see the adapter directory's path)."})
    served_adapter: Optional[str] = field(default=None, metadata={
        "help": "backend openai: the name the server serves the trained adapter under (--lora-modules); None: "
                "loaded at run time."})
    adapter_check_probes: int = field(default=8, metadata={
        "help": "Before the trained model answers, the first this many questions of the benchmark check that the "
                "adapter changes the next-token log-probabilities at all (m3po_core/evaluation/adapter_check.py); "
                "0 skips the check."})
    adapter_check_min_change: float = field(default=1e-4, metadata={
        "help": "The adapter check fails (the run stops, naming the backend and adapter) when no top-k next-token "
                "log-probability of any probe moves by this much from the base model's."})
    answer_suffix: str = field(default="\nAnswer the question using a single word or phrase.", metadata={
        "help": "Appended to public questions, as LLaVA-1.5's evaluation does."})


@dataclass
class IPAConfig:
    """IPA, the second method (ipa-arxiv-2503.20309; m3po_core/ipa.py): pairs of a verified response
    against a failed one, collected in rounds. The paper gives no sample counts; these are ours."""

    rounds: int = field(default=3, metadata={"help": "Rounds at most of sampling, revision and verification: a "
                                                     "prompt unresolved in one is carried to the next, and the "
                                                     "rounds stop early once every prompt is resolved."})
    n_normal: int = field(default=4, metadata={"help": "Samples per prompt and round on the clean image."})
    n_contrastive: int = field(default=4, metadata={
        "help": "Samples on a perturbed image (noise / blur / scaling, one drawn per sample)."})
    revise: bool = field(default=True, metadata={
        "help": "Reflective revision: feedback on each sample, then a refined response."})
    reviser: str = field(default="reference", metadata={
        "help": "The reviser: \"reference\" (the synthetic world's simulated reviser), \"policy\" (the generator "
                "itself, through the sampling backend) or \"openai:<model>\" (any OpenAI-compatible VLM)."})
    reviser_base_url: Optional[str] = field(default=None, metadata={"help": "An openai reviser's server URL (None: "
                                                                            "OpenAI's API)."})
    verifier: str = field(default="reference", metadata={
        "help": "The verifier: \"reference\" (the synthetic world's scene graphs) or \"openai:<model>\"."})
    verifier_base_url: Optional[str] = field(default=None, metadata={"help": "An openai verifier's server URL (None: "
                                                                             "OpenAI's API)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "For an openai reviser / verifier; the key is read from this variable, never stored."})
    concurrency: int = field(default=8, metadata={"help": "An openai reviser's / verifier's requests in flight."})
    max_new_tokens: int = field(default=64, metadata={"help": "Feedback and refined responses."})
    reference_feedback_from_round: int = field(default=3, metadata={
        "help": "The reference answer joins the feedback step from this round."})
    self_evolve: bool = field(default=True, metadata={
        "help": "Rounds >= 2 sample from the generator DPO-trained on the earlier pairs."})
    fix_rate: float = field(default=0.5, metadata={
        "help": "Reference reviser only: chance a refinement fixes the answer."})
    reference_fix_rate: float = field(default=0.8, metadata={
        "help": "Reference reviser only: chance a refinement fixes the answer with the reference answer in the "
                "feedback step."})
    seed: int = field(default=0, metadata={
        "help": "IPA's seed: its samples and perturbations per round, the reference reviser's draws, and which "
                "verified and failed responses make a prompt's pair."})


@dataclass
class RunConfig:
    """One run: its name, its seed and one section per stage."""

    name: str = field(default="m3po", metadata={"help": "The configuration's name: the run id under the store "
                                                        "root unless --run-id names one (`m3po ipa`: NAME-ipa)."})
    seed: int = field(default=0, metadata={
        "help": "The run's seed: the synthetic world's scenes, prompts and benchmarks, and the tiny CLIP's "
                "training."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Where the prompts come from."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Candidate generation."})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"help": "MAS: encoder and judge."})
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"help": "Pair selection."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "LoRA-DPO."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "Held-out "
                                                                                             "benchmarks."})
    execution: ExecutionConfig = field(default_factory=ExecutionConfig, metadata={"help": "Where shards run."})
    ipa: IPAConfig = field(default_factory=IPAConfig, metadata={"help": "IPA, the second method (`m3po ipa`)."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
