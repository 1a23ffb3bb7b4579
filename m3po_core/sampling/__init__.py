"""Candidate sampling: one interface, backends side by side.

- `transformers_backend.TransformersSampler`: HF `generate`, runs anywhere (the demo, CPU tests).
- `vllm_backend.VLLMSampler`: vLLM's offline engine, one per GPU worker process (LLaVA-1.5 at scale).
- `openai_backend.OpenAICompatibleSampler`: any OpenAI-compatible server (`vllm serve`, ...).

Every backend returns, per prompt, `n` `Candidate`s whose log-probabilities are the raw
(untempered, unfiltered) model log-probabilities of the sampled tokens taken from the generation
itself: log P(R | I, Q) under the base model, the confidence term of the M3P-Score (paper 3.4).
A run builds its sampler for (model, adapter, backend) through `m3po_core.components.sampler_for`.

Seeds: `sample(..., seed)` takes either one batch seed (an int: the batch's candidates come from one
random stream, so a prompt's samples depend on the batch it is in) or one seed per prompt (a
sequence: candidate j of prompt i is drawn with seed `seed[i] + j` alone, so a prompt's first k
candidates are the same whether k or 32 are asked for, in one call or in rounds: what adaptive
sampling needs; `candidate_seeds`). vLLM and OpenAI-compatible servers seed completion j of a request
with seed + j, so for them both are one request seed per prompt; the transformers backend draws
per-candidate seeds by Gumbel-max from one generator per sequence.

`next_token_logprobs` reports the top-k raw log-probabilities of the first generated position (the
same prompt `greedy` answers): evaluation compares base and adapter on them
(`m3po_core.evaluation.adapter_check`) to refuse an adapter that changes nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

from PIL import Image


@dataclass(frozen=True)
class SamplingParams:
    n: int = 32
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 48
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    text: str
    token_ids: list[int]     # as sampled, EOS included when emitted (it is part of P(R | I, Q))
    logp_sum: float
    logp_mean: float
    n_tokens: int
    finish_reason: str       # "stop" | "length"
    seed: int


class Sampler(Protocol):
    name: str

    def sample(self, images: Sequence[Image.Image], instructions: Sequence[str], params: SamplingParams,
               seed: int | Sequence[int]) -> list[list[Candidate]]: ...

    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str],
               max_new_tokens: int) -> list[str]: ...

    def next_token_logprobs(self, images: Sequence[Image.Image], instructions: Sequence[str],
                            top_k: int) -> list[dict[int | str, float]]:
        """Per prompt, token (id; a token string where an OpenAI-compatible server gives no ids) ->
        raw log-probability at the first generated position, for (at least) its `top_k` likeliest tokens."""
        ...


def batch_seed(base_seed: int, prompt_ids: Sequence[str]) -> int:
    """A batch's seed depends on its prompts, not on how prompts were cut into shards or workers."""
    digest = hashlib.sha256(f"{base_seed}:{'|'.join(prompt_ids)}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """The seed of a prompt's candidate 0; candidate j is drawn with this + j (`sampling.seeding: candidate`)."""
    digest = hashlib.sha256(f"{base_seed}:candidate:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def request_seeds(seed: int | Sequence[int], n_prompts: int, n: int) -> list[int]:
    """Each prompt's request seed: its own (per-prompt seeds) or the batch seed + i * n (prompts n
    apart, so identical prompts in a batch still differ under servers that seed completion j with seed + j)."""
    if isinstance(seed, int):
        return [seed + i * n for i in range(n_prompts)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    return seeds


def candidate_seed(seed: int | Sequence[int], prompt: int, j: int) -> int:
    """What Candidate.seed records: the batch seed, or this candidate's own seed."""
    return seed if isinstance(seed, int) else int(seed[prompt]) + j


def greedy_batched(sampler: Sampler, images: Sequence[Image.Image], instructions: Sequence[str],
                   max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for any number of prompts, `batch_size` prompts per backend call."""
    answers: list[str] = []
    for i in range(0, len(instructions), batch_size):
        answers += sampler.greedy(images[i: i + batch_size], instructions[i: i + batch_size], max_new_tokens)
    return answers


class AdapterSampler:
    """An engine's base model with a LoRA adapter applied per request (vLLM)."""

    def __init__(self, engine, adapter_dir: str) -> None:
        self.engine, self.adapter_dir = engine, adapter_dir
        self.name = f"{engine.name}+lora"

    def sample(self, images: Sequence[Image.Image], instructions: Sequence[str], params: SamplingParams,
               seed: int | Sequence[int]) -> list[list[Candidate]]:
        return self.engine.sample(images, instructions, params, seed, adapter_dir=self.adapter_dir)

    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int) -> list[str]:
        return self.engine.greedy(images, instructions, max_new_tokens, adapter_dir=self.adapter_dir)

    def next_token_logprobs(self, images: Sequence[Image.Image], instructions: Sequence[str],
                            top_k: int) -> list[dict[int | str, float]]:
        return self.engine.next_token_logprobs(images, instructions, top_k, adapter_dir=self.adapter_dir)
