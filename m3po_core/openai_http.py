"""HTTP to OpenAI-protocol servers, shared by the sampler, the judge and IPA's verifier.

Transport failures (429, 5xx, 408/409, timeouts, connection errors) are the openai client's to retry:
it backs off exponentially with jitter (0.5 s doubling to 8 s) and honours `retry-after-ms` /
`retry-after`. What it cannot do is kept here:
- a reply that arrived but cannot be read (not JSON, no verdict, ratings missing) is retried too,
  and from the same budget: `Budget` gives each request's client the retries left and takes back
  those it used (`retries_taken`), so a request makes at most `max_retries + 1` attempts whatever
  mix of failures it meets;
- errors are described in one line with the API key redacted: a key never reaches a log, a record
  or an exception message.
Limit: retries are per request; there is no budget shared across requests (see the judge's own).
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
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import openai
from PIL import Image

log = logging.getLogger("m3po.http")
T = TypeVar("T")

RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx


class MalformedReply(ValueError):
    """The server answered 200 but not with what was asked for (counts as a failed attempt)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # attempts = max_retries + 1, transport and unreadable replies together
    backoff_base: float = 0.5  # seconds before the first retry of an unreadable reply; doubles each retry
    backoff_max: float = 8.0

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retrying an unreadable reply ``retry_number`` (0-based): capped
        exponential backoff with 0-25 % jitter (spreads a thundering herd). A reply that arrived
        carries no Retry-After to honour; transport retries wait as the openai client decides."""
        backoff = min(self.backoff_base * 2.0 ** retry_number, self.backoff_max)
        return backoff * (1.0 - 0.25 * random.random())


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


class Budget:
    """The attempts one request has left, shared by the client's transport retries and the retries
    of unreadable replies: `client()` is the openai client allowed the retries left, `took(raw)`
    counts those it spent on a reply (openai's raw response says how many)."""

    def __init__(self, max_retries: int):
        self.left = max_retries

    def client(self, client: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
        return client.with_options(max_retries=self.left)

    def took(self, raw: Any) -> None:
        self.left -= getattr(raw, "retries_taken", 0)


async def with_retries(attempt: Callable[[Budget], Awaitable[T]], policy: RetryPolicy, what: str,
                       secret: str | None = None) -> T:
    """Run ``attempt(budget)`` until it succeeds. A transport error reaches here after the client's
    own retries (the budget left) and is re-raised; an unreadable reply (``MalformedReply`` or a
    body that is not JSON) costs one retry of the budget, after a backoff."""
    budget = Budget(policy.max_retries)
    retry_number = 0
    while True:
        try:
            return await attempt(budget)
        except ValueError as error:  # the reply arrived but is unreadable: MalformedReply, or not JSON
            if budget.left <= 0:
                raise
            budget.left -= 1
            pause = policy.delay(retry_number)
            retry_number += 1
            log.warning("%s: unreadable reply (%s); retrying in %.2f s, %d retries left", what,
                        describe_error(error, secret), pause, budget.left)
            await asyncio.sleep(pause)


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
