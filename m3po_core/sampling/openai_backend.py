"""Sampling from an OpenAI-compatible chat-completions server (e.g. ``vllm serve llava-hf/llava-1.5-7b-hf``).

One request per prompt: the image as a base64 PNG data URL, ``n = params.n`` samples, explicit
``max_tokens``, ``seed``, ``logprobs=True`` with ``top_logprobs=0``, and vLLM's extra body parameter
``return_tokens_as_token_ids=True`` so each ``logprobs.content[j].token`` reads ``"token_id:123"``.
A server that ignores that parameter returns token strings; the candidate's ``token_ids`` is then
``[]`` (training needs the ids, so such candidates are only good for scoring).
``next_token_logprobs`` asks for one greedy token with ``top_logprobs=k`` and reads the first
position's ``top_logprobs`` (keys: ids where the server gives ``"token_id:N"``, else the strings).

The log-probabilities are whatever the server reports. vLLM reports the raw (pre-temperature,
pre-top-p) log-probabilities by default (its ``logprobs_mode``, "raw_logprobs"), which is what the
M3P-Score's confidence term needs; other servers may report processed ones. ``n_tokens`` is the
number of logprob entries, so it counts EOS exactly when the server reports it.

Failures: 429, 5xx, 408/409, timeouts and connection errors are retried by the openai client
(exponential backoff with jitter, ``retry-after-ms`` / ``retry-after`` honoured), unreadable answers
by ``with_retries``, from one budget of ``max_retries`` retries per prompt (``openai_http.Budget``),
so the attempt count is exact. A prompt that still fails raises ``SamplingError`` naming its index:
a shard fails whole rather than storing partial candidates.

Transport, retries and redaction: ``m3po_core.openai_http`` (shared with the judge and the verifier).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Sequence, TypeVar

import openai
from PIL import Image

from m3po_core.openai_http import (Budget, MalformedReply, RetryPolicy, describe_error, png_data_url, read_api_key,
                                   redact, run_sync, with_retries)
from m3po_core.sampling import Candidate, SamplingParams, candidate_seed, request_seeds

log = logging.getLogger("m3po.sampling.openai")
T = TypeVar("T")

TOKEN_ID_PREFIX = "token_id:"


class SamplingError(RuntimeError):
    """A prompt could not be sampled; the message names its index in the batch."""


# ---------------------------------------------------------------- the sampler


class JSONObject(dict):
    """A JSON object whose fields read as attributes (a missing one reads None), as the client's
    typed reply objects do."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


def read_completion(text: str) -> JSONObject:
    """A chat completion's JSON body. Read as plain JSON, not through the client's typed objects:
    building those costs ~0.1 s of CPU per prompt at 32 candidates x 150 logprob entries (measured by
    bench/scale.py), the JSON parser a few milliseconds."""
    try:
        body = json.loads(text, object_hook=JSONObject)
    except ValueError:
        raise MalformedReply("the reply is not JSON") from None
    if not isinstance(body, JSONObject) or not isinstance(body.choices, list):
        raise MalformedReply("the reply is not a chat completion")
    return body


def parse_token_ids(tokens: Sequence[str]) -> list[int]:
    """``"token_id:123"`` entries -> ids; ``[]`` if any entry is a plain token string."""
    if not all(t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        return []
    return [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]


def first_position_top_logprobs(completion: Any) -> dict[int | str, float]:
    """A chat completion -> token -> log-probability from ``choices[0].logprobs.content[0].top_logprobs``."""
    if not completion.choices:
        raise MalformedReply("no choices in the reply")
    logprobs = completion.choices[0].logprobs
    top = logprobs.content[0].top_logprobs if logprobs is not None and logprobs.content else None
    if not top:
        raise MalformedReply("no top_logprobs in the reply (does the server support top_logprobs?)")
    ids = parse_token_ids([e.token for e in top])
    return dict(zip(ids or [e.token for e in top], (float(e.logprob) for e in top)))


def candidate_from_choice(choice: Any, seed: int) -> Candidate:
    if choice.finish_reason not in ("stop", "length"):
        raise MalformedReply(f"finish_reason {choice.finish_reason!r} (expected 'stop' or 'length')")
    entries = choice.logprobs.content if choice.logprobs is not None else None
    if entries is None:
        raise MalformedReply("no logprobs in the reply (does the server support logprobs=True?)")
    logp_sum = float(sum(e.logprob for e in entries))
    n_tokens = len(entries)
    return Candidate(
        text=((choice.message or JSONObject()).content or "").strip(),
        token_ids=parse_token_ids([e.token for e in entries]),
        logp_sum=logp_sum, logp_mean=logp_sum / max(n_tokens, 1), n_tokens=n_tokens,
        finish_reason=choice.finish_reason, seed=seed,
    )


class OpenAICompatibleSampler:
    name = "openai"

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 4, timeout: float = 120.0, backoff_base: float = 0.5,
                 backoff_max: float = 8.0) -> None:
        self.model = model
        self.base_url = base_url
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries, backoff_base, backoff_max)
        self._api_key = read_api_key(api_key_env, base_url)  # never printed: see __repr__

    def __repr__(self) -> str:
        return f"OpenAICompatibleSampler(model={self.model!r}, base_url={self.base_url!r})"

    def sample(self, images: Sequence[Image.Image], instructions: Sequence[str], params: SamplingParams,
               seed: int | Sequence[int]) -> list[list[Candidate]]:
        # One request seed per prompt (the batch seed + index * n, or the prompt's own); Candidate.seed
        # records the batch seed, or with per-prompt seeds the candidate's own (vLLM draws choice j with seed + j).
        seeds = request_seeds(seed, len(instructions), params.n)

        def request(i: int) -> dict[str, Any]:
            return dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                        max_tokens=params.max_new_tokens, seed=seeds[i], logprobs=True, top_logprobs=0,
                        extra_body={"return_tokens_as_token_ids": True})

        def read(i: int, completion: Any) -> list[Candidate]:
            if len(completion.choices) != params.n:
                raise MalformedReply(f"{len(completion.choices)} choices for n={params.n}")
            return [candidate_from_choice(c, candidate_seed(seed, i, j))
                    for j, c in enumerate(sorted(completion.choices, key=lambda c: c.index))]

        return run_sync(lambda: self._run_all(images, instructions, request, read))

    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int) -> list[str]:
        def request(i: int) -> dict[str, Any]:
            return dict(n=1, temperature=0.0, max_tokens=max_new_tokens)

        def read(i: int, completion: Any) -> str:
            if not completion.choices:
                raise MalformedReply("no choices in the reply")
            return ((completion.choices[0].message or JSONObject()).content or "").strip()

        return run_sync(lambda: self._run_all(images, instructions, request, read))

    def next_token_logprobs(self, images: Sequence[Image.Image], instructions: Sequence[str],
                            top_k: int) -> list[dict[int | str, float]]:
        def request(i: int) -> dict[str, Any]:
            return dict(n=1, temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=top_k,
                        extra_body={"return_tokens_as_token_ids": True})

        return run_sync(lambda: self._run_all(images, instructions, request,
                                              lambda i, completion: first_position_top_logprobs(completion)))

    async def _run_all(self, images: Sequence[Image.Image], instructions: Sequence[str],
                       request: Callable[[int], dict[str, Any]], read: Callable[[int, Any], T]) -> list[T]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images for {len(instructions)} instructions")
        gate = asyncio.Semaphore(self.concurrency)
        # The client is made inside the running loop: its connection pool belongs to that loop.
        async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                      timeout=self.timeout) as client:

            async def one(i: int) -> T:
                messages = [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(images[i])}},
                    {"type": "text", "text": instructions[i]}]}]

                async def attempt(budget: Budget) -> T:
                    async with gate:
                        raw = await budget.client(client).chat.completions.with_raw_response.create(
                            model=self.model, messages=messages, **request(i))
                    budget.took(raw)
                    return read(i, read_completion(raw.text))

                try:
                    return await with_retries(attempt, self.retry, f"sampler prompt {i}", self._api_key)
                except Exception as error:
                    raise SamplingError(f"prompt {i} failed after at most {self.retry.max_retries + 1} attempts: "
                                        f"{describe_error(error, self._api_key)}") from None

            try:
                async with asyncio.TaskGroup() as tasks:  # one failure cancels the rest
                    running = [tasks.create_task(one(i)) for i in range(len(instructions))]
            except BaseExceptionGroup as group:
                failures = [e for e in group.exceptions if isinstance(e, SamplingError)]
                raise (failures[0] if failures else group.exceptions[0]) from None
        return [task.result() for task in running]



def load_lora_adapter(base_url: str, api_key_env: str, name: str, adapter_dir: str, timeout: float = 300.0) -> str:
    """Ask a vLLM server to serve a LoRA adapter under `name` (its runtime endpoint
    `POST {base_url}/load_lora_adapter`, enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); returns
    the model name to request. The server reads `adapter_dir` from its own file system. An adapter
    already loaded under that name is reused (names carry the training key, so a new adapter gets
    a new name)."""
    import httpx

    key = read_api_key(api_key_env, base_url)
    url = base_url.rstrip("/") + "/load_lora_adapter"
    try:
        r = httpx.post(url, json={"lora_name": name, "lora_path": adapter_dir},
                       headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
    except httpx.HTTPError as e:
        raise SamplingError(f"loading LoRA adapter {name!r} on {url}: {redact(str(e), key)}") from None
    if r.status_code == 200 or "already been loaded" in r.text:
        log.info("server %s serves adapter %s from %s", base_url, name, adapter_dir)
        return name
    raise SamplingError(f"loading LoRA adapter {name!r} on {url}: HTTP {r.status_code}: {redact(r.text[:300], key)} "
                        "(start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or set "
                        "evaluation.served_adapter to a name it serves with --lora-modules)")
