"""Sampling from an OpenAI-compatible chat-completions server (e.g. ``vllm serve llava-hf/llava-1.5-7b-hf``).

One request per prompt: the image as a base64 PNG data URL, ``n = params.n`` samples, explicit
``max_tokens``, ``seed``, ``logprobs=True`` with ``top_logprobs=0``, and vLLM's extra body parameter
``return_tokens_as_token_ids=True`` so each ``logprobs.content[j].token`` reads ``"token_id:123"``.
A server that ignores that parameter returns token strings; the candidate's ``token_ids`` is then
``[]`` (training needs the ids, so such candidates are only good for scoring).

The log-probabilities are whatever the server reports. vLLM reports the raw (pre-temperature,
pre-top-p) log-probabilities by default (its ``logprobs_mode``, "raw_logprobs"), which is what the
M3P-Score's confidence term needs; other servers may report processed ones. ``n_tokens`` is the
number of logprob entries, so it counts EOS exactly when the server reports it.

Failures: 429, 5xx, 408/409, timeouts, connection errors and unreadable answers are retried with
exponential backoff and jitter (a ``retry-after-ms`` / ``retry-after`` header is honoured), at most
``max_retries`` times per prompt. This module owns every retry (the openai client runs with
``max_retries=0``) so one budget covers transport and content failures and the attempt count is
exact. A prompt that still fails raises ``SamplingError`` naming its index: a shard fails whole
rather than storing partial candidates.

The retry helpers here are shared with ``m3po_core.scoring.openai_judge``.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

import openai
from openai.types.chat import ChatCompletion
from PIL import Image

from m3po_core.sampling import Candidate, SamplingParams

log = logging.getLogger("m3po.sampling.openai")
T = TypeVar("T")

RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx
MAX_RETRY_AFTER_S = 60.0  # a server asking for longer is treated as a failure of this attempt's budget
TOKEN_ID_PREFIX = "token_id:"


class SamplingError(RuntimeError):
    """A prompt could not be sampled; the message names its index in the batch."""


class MalformedReply(ValueError):
    """The server answered 200 but not with what was asked for (counts as a failed attempt)."""


# ---------------------------------------------------------------- shared transport helpers


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # attempts = max_retries + 1
    backoff_base: float = 0.5  # seconds before the first retry; doubles each retry
    backoff_max: float = 8.0

    def delay(self, retry_number: int, error: BaseException | None = None) -> float:
        """Seconds to wait before retry ``retry_number`` (0-based): the server's Retry-After if it
        gave a sane one, else capped exponential backoff with 0-25 % jitter (spreads a thundering herd)."""
        retry_after = retry_after_seconds(error)
        if retry_after is not None:
            return retry_after
        backoff = min(self.backoff_base * 2.0 ** retry_number, self.backoff_max)
        return backoff * (1.0 - 0.25 * random.random())


def retry_after_seconds(error: BaseException | None) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(header)) / divisor
        except (TypeError, ValueError):
            continue
        if 0.0 <= seconds <= MAX_RETRY_AFTER_S:
            return seconds
    return None


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS or error.status_code >= 500
    # APITimeoutError is an APIConnectionError. A 200 whose body is not JSON surfaces from the
    # client as a bare json.JSONDecodeError (a ValueError), not an openai error.
    return isinstance(error, (openai.APIConnectionError, ValueError))


def describe_error(error: BaseException, secret: str | None = None) -> str:
    """A one-line, secret-free description: the type and status, never request headers."""
    status = getattr(error, "status_code", None)
    text = f"{type(error).__name__}" + (f" (HTTP {status})" if status else "")
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    if detail:
        text += f": {detail}"
    return redact(text, secret)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str,
                       secret: str | None = None) -> T:
    """Run ``attempt`` until it succeeds or ``policy.max_retries`` retries are spent; re-raise the last
    error (non-retryable errors at once)."""
    for retry_number in range(policy.max_retries + 1):
        try:
            return await attempt()
        except Exception as error:  # noqa: BLE001 (classified just below)
            if not is_retryable(error) or retry_number == policy.max_retries:
                raise
            pause = policy.delay(retry_number, error)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2f s", what, retry_number + 1,
                        policy.max_retries + 1, describe_error(error, secret), pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


def read_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key from the environment. A self-hosted server (base_url given) may need none: vLLM's
    convention is the placeholder "EMPTY"."""
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_url:
        return "EMPTY"
    raise ValueError(f"environment variable {api_key_env} is not set (it must hold the API key)")


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def run_sync(coroutine_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code: directly when this thread has no running event
    loop (including worker threads), else on a fresh thread (asyncio.run cannot nest)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_factory())).result()


# ---------------------------------------------------------------- the sampler


def parse_token_ids(tokens: Sequence[str]) -> list[int]:
    """``"token_id:123"`` entries -> ids; ``[]`` if any entry is a plain token string."""
    if not all(t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        return []
    return [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]


def candidate_from_choice(choice: Any, seed: int) -> Candidate:
    if choice.finish_reason not in ("stop", "length"):
        raise MalformedReply(f"finish_reason {choice.finish_reason!r} (expected 'stop' or 'length')")
    entries = choice.logprobs.content if choice.logprobs is not None else None
    if entries is None:
        raise MalformedReply("no logprobs in the reply (does the server support logprobs=True?)")
    logp_sum = float(sum(e.logprob for e in entries))
    n_tokens = len(entries)
    return Candidate(
        text=(choice.message.content or "").strip(),
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
               seed: int) -> list[list[Candidate]]:
        # Each prompt gets its own request seed (seed + index * n) so identical prompts in a batch still
        # differ; Candidate.seed records the batch seed, as the transformers backend does.
        def request(i: int) -> dict[str, Any]:  # vLLM seeds choice j with seed + j: prompts n apart
            return dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                        max_tokens=params.max_new_tokens, seed=seed + i * params.n, logprobs=True, top_logprobs=0,
                        extra_body={"return_tokens_as_token_ids": True})

        def read(i: int, completion: Any) -> list[Candidate]:
            if len(completion.choices) != params.n:
                raise MalformedReply(f"{len(completion.choices)} choices for n={params.n}")
            return [candidate_from_choice(c, seed) for c in sorted(completion.choices, key=lambda c: c.index)]

        return run_sync(lambda: self._run_all(images, instructions, request, read))

    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int) -> list[str]:
        def request(i: int) -> dict[str, Any]:
            return dict(n=1, temperature=0.0, max_tokens=max_new_tokens)

        def read(i: int, completion: Any) -> str:
            if not completion.choices:
                raise MalformedReply("no choices in the reply")
            return (completion.choices[0].message.content or "").strip()

        return run_sync(lambda: self._run_all(images, instructions, request, read))

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

                async def attempt() -> T:
                    async with gate:
                        completion = await client.chat.completions.create(
                            model=self.model, messages=messages, **request(i))
                    if not isinstance(completion, ChatCompletion):  # a non-JSON 200 comes back as its text
                        raise MalformedReply("the reply is not a chat completion")
                    return read(i, completion)

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
