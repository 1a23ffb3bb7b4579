"""A vision judge behind the ``Judge`` interface, served by an OpenAI-compatible chat-completions API.

The rubric (``RUBRIC_VERSION``) asks for three 1-10 ratings (visual relevance, semantic accuracy,
instruction adherence) as JSON; each maps to [0, 1] by (r - 1) / 9 and the three combine with
``judge.weighted_score``, so ``overall`` is on the reference judge's scale.

- ``candidates_per_call > 1`` rates up to that many responses to the same prompt (same image) in one
  request: the image is sent once per call, the responses are numbered and the reply is
  ``{"ratings": [{"id": 1, "relevance": .., "accuracy": .., "adherence": ..}, ...]}``.
- The reply parser is tolerant (``parse_ratings``); a reply it cannot read, or one that leaves a
  candidate out, costs one attempt and the unrated candidates are asked again in a fresh request.
  Transport failures (429, 5xx, timeouts, connection errors) are retried by the openai client (its
  backoff, honouring Retry-After) from the same budget (``openai_http.Budget``). After
  ``max_retries + 1`` attempts a candidate's score is None: recorded as missing, never invented.
  Non-retryable HTTP errors (401, 400, ...) raise ``JudgeError``: a wrong key or model name must
  stop the run, not empty it.
- Cache: one JSON file per (model, rubric, image, instruction, response) under ``cache_dir``;
  only successful ratings are stored; a cached candidate never reaches the server.
- The API key is read once from ``api_key_env`` and kept out of reprs, logs, errors, the cache and
  ``usage``.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import openai
from openai.types.chat import ChatCompletion

from m3po_core.errors import InputError, M3POError
from m3po_core.openai_http import (
    Budget,
    MalformedReply,
    RetryPolicy,
    describe_error,
    is_retryable,
    png_bytes,
    read_api_key,
    run_sync,
)
from m3po_core.scoring.judge import JudgeItem, JudgeScore, weighted_score

log = logging.getLogger("m3po.judge")

RUBRIC_VERSION = "m3po-rubric-1"  # part of every cache key: change it when the prompt changes
AXES = ("relevance", "accuracy", "adherence")
Ratings = tuple[float, float, float]  # raw 1-10, in AXES order

SYSTEM_PROMPT = """You are a strict, impartial judge of answers to questions about an image.
Rate each response on three axes, each an integer from 1 (worst) to 10 (best):
- relevance: visual relevance. Does the response talk about what is actually in the image? Objects,
  attributes or relations it claims that the image does not show lower this rating.
- accuracy: semantic accuracy. Is what the response says correct, given the image and the instruction?
- adherence: instruction adherence. Does the response do what the instruction asks, in the asked form
  (e.g. a yes/no first for a yes/no question), without padding or repetition?
Judge each response on its own. Reply with the JSON object only, no other text."""


class JudgeError(M3POError):
    """The judge cannot work at all (bad key, unknown model): the message never holds the key."""


# ---------------------------------------------------------------- prompt


def rubric_text(instruction: str, responses: Sequence[str]) -> str:
    if len(responses) == 1:
        return (f"Instruction:\n{instruction}\n\nResponse:\n{responses[0]}\n\n"
                'Reply with JSON: {"relevance": <1-10>, "accuracy": <1-10>, "adherence": <1-10>}')
    numbered = "\n\n".join(f"[{i}]\n{text}" for i, text in enumerate(responses, start=1))
    return (f"Instruction:\n{instruction}\n\nResponses ({len(responses)}, rate each one independently):\n\n"
            f"{numbered}\n\n"
            'Reply with JSON: {"ratings": [{"id": <response number>, "relevance": <1-10>, '
            f'"accuracy": <1-10>, "adherence": <1-10>}}, ...]}} with one entry for each id from 1 to {len(responses)}')


def rubric_messages(image_data_url: str, instruction: str, responses: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url}},
            {"type": "text", "text": rubric_text(instruction, responses)},
        ]},
    ]


def to_score(ratings: Ratings) -> JudgeScore:
    relevance, accuracy, adherence = ((r - 1.0) / 9.0 for r in ratings)
    return weighted_score(relevance=relevance, accuracy=accuracy, adherence=adherence)


# ---------------------------------------------------------------- tolerant reply parser

_AXIS_STEMS = {"relevance": ("relevan",), "accuracy": ("accura", "correct"), "adherence": ("adher", "follow")}
_ID_KEYS = {"id", "index", "response", "responseid", "responsenumber", "candidate", "candidateid", "number", "n"}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$")  # "7", "7.5", "7/10"
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


def _letters(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


def _rating(value: Any) -> float | None:
    """A 1-10 rating from a number, a numeric string or {"score": n}; None if absent or out of range."""
    if isinstance(value, dict):
        value = next((v for k, v in value.items() if _letters(k) in ("score", "rating", "value")), None)
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = _NUMBER.match(value)
        value = float(match.group(1)) if match else None
    if isinstance(value, (int, float)) and 1.0 <= float(value) <= 10.0:
        return float(value)
    return None


def _axis_ratings(entry: dict) -> Ratings | None:
    found: dict[str, float | None] = {}
    for key, value in entry.items():
        letters = _letters(str(key))
        for axis, stems in _AXIS_STEMS.items():
            if axis not in found and any(stem in letters for stem in stems):
                found[axis] = _rating(value)
    values = [found.get(axis) for axis in AXES]
    return None if any(v is None for v in values) else tuple(values)  # type: ignore[return-value]


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = re.search(r"\d+", str(value))
    return int(match.group()) if match else None


def _entry_id(entry: dict, default: int) -> int | None:
    for key, value in entry.items():
        if _letters(str(key)) in _ID_KEYS:
            return _as_id(value)
    return default


def _ratings_in(obj: Any) -> dict[int, Ratings]:
    """Ratings by 1-based id from the shapes judges produce: a flat object, a list of objects, a list
    under any key ("ratings", "scores", ...), or objects keyed by id ({"1": {...}, "response_2": {...}})."""
    found: dict[int, Ratings] = {}
    if isinstance(obj, list):
        for position, entry in enumerate(obj, start=1):
            if isinstance(entry, dict) and (ratings := _axis_ratings(entry)) is not None:
                if (entry_id := _entry_id(entry, position)) is not None:
                    found.setdefault(entry_id, ratings)
        return found
    if not isinstance(obj, dict):
        return found
    if (ratings := _axis_ratings(obj)) is not None:
        entry_id = _entry_id(obj, 1)
        return {entry_id: ratings} if entry_id is not None else {}
    for key, value in obj.items():
        if isinstance(value, list):
            found.update({k: v for k, v in _ratings_in(value).items() if k not in found})
        elif isinstance(value, dict) and (ratings := _axis_ratings(value)) is not None:
            entry_id = _entry_id(value, _as_id(key) or 0)
            if entry_id:
                found.setdefault(entry_id, ratings)
    return found


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON value the text may hold: fenced blocks, the whole text, then each {...} or [...]."""
    decoder = json.JSONDecoder()
    for chunk in [*_FENCE.findall(text), text]:
        chunk = chunk.strip()
        try:
            yield json.loads(chunk)
            continue
        except ValueError:
            pass
        for match in re.finditer(r"[{\[]", chunk):
            try:
                yield decoder.raw_decode(chunk, match.start())[0]
            except ValueError:
                continue


def parse_ratings(text: str, n_responses: int) -> dict[int, Ratings]:
    """Valid 1-10 ratings by response id (1..n_responses) from a judge's reply; ids left out, or with
    any rating missing or outside 1-10, are absent. The first JSON value holding any rating wins."""
    for value in _json_values(text or ""):
        found = {i: r for i, r in _ratings_in(value).items() if 1 <= i <= n_responses}
        if found:
            return found
    return {}


# ---------------------------------------------------------------- cache


def cache_key(model: str, image_sha256: str, instruction: str, response: str) -> str:
    fields = json.dumps([model, RUBRIC_VERSION, image_sha256, instruction, response], ensure_ascii=False)
    return hashlib.sha256(fields.encode()).hexdigest()


class RatingCache:
    """One small JSON file per key; written to a temp file then renamed, so readers see all or nothing."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Ratings | None:
        try:
            stored = json.loads(self._path(key).read_text())["ratings"]
            return tuple(float(stored[axis]) for axis in AXES)  # type: ignore[return-value]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: rate again

    def put(self, key: str, ratings: Ratings, model: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rubric": RUBRIC_VERSION, "model": model, "ratings": dict(zip(AXES, ratings))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- the judge


@dataclass(frozen=True)
class _Candidate:
    """A distinct (image, instruction, response) to rate; duplicates across items share one."""

    key: str
    prompt_id: str
    image_url: str
    instruction: str
    response: str


class OpenAIJudge:
    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 4, timeout: float = 60.0, candidates_per_call: int = 1,
                 cache_dir: str | None = None, price_per_1k_input: float | None = None,
                 price_per_1k_output: float | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 8.0, max_tokens_per_rating: int = 80) -> None:
        if candidates_per_call < 1:
            raise ValueError("candidates_per_call must be >= 1")
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = base_url
        self.concurrency = concurrency
        self.timeout = timeout
        self.candidates_per_call = candidates_per_call
        self.retry = RetryPolicy(max_retries, backoff_base, backoff_max)
        self.cache = RatingCache(cache_dir) if cache_dir else None
        self.price_per_1k_input = price_per_1k_input
        self.price_per_1k_output = price_per_1k_output
        self.max_tokens_per_rating = max_tokens_per_rating
        self._api_key = read_api_key(api_key_env, base_url)  # never printed: see __repr__
        self._counts = {"requests": 0, "failed_requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                        "cache_hits": 0, "rated": 0, "unrated": 0}

    def __repr__(self) -> str:
        return (f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, "
                f"candidates_per_call={self.candidates_per_call})")

    @property
    def usage(self) -> dict[str, Any]:
        """Totals over this judge's life; ``cost`` (in the prices' currency) is None unless both prices are set."""
        cost = None
        if self.price_per_1k_input is not None and self.price_per_1k_output is not None:
            cost = (self._counts["prompt_tokens"] * self.price_per_1k_input
                    + self._counts["completion_tokens"] * self.price_per_1k_output) / 1000.0
        return {**self._counts, "cost": cost}

    def score(self, items: Sequence[JudgeItem]) -> list[JudgeScore | None]:
        candidates = self._candidates(items)
        ratings: dict[str, Ratings] = {}
        if self.cache is not None:
            for candidate in {c.key: c for c in candidates}.values():
                if (hit := self.cache.get(candidate.key)) is not None:
                    ratings[candidate.key] = hit
                    self._counts["cache_hits"] += 1
        to_rate = list({c.key: c for c in candidates if c.key not in ratings}.values())
        if to_rate:
            ratings.update(run_sync(lambda: self._rate_all(to_rate)))
        results = [to_score(ratings[c.key]) if c.key in ratings else None for c in candidates]
        self._counts["unrated"] += sum(r is None for r in results)
        return results

    def _candidates(self, items: Sequence[JudgeItem]) -> list[_Candidate]:
        encoded: dict[int, tuple[str, str]] = {}  # id(image) -> (sha256, data URL): encode each image once
        candidates = []
        for item in items:
            if item.image is None:
                raise InputError(f"prompt {item.prompt_id}: the OpenAI judge needs the image")
            if id(item.image) not in encoded:
                png = png_bytes(item.image)
                encoded[id(item.image)] = (hashlib.sha256(png).hexdigest(),
                                           "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
            image_sha, image_url = encoded[id(item.image)]
            candidates.append(_Candidate(cache_key(self.model, image_sha, item.instruction, item.response),
                                         item.prompt_id, image_url, item.instruction, item.response))
        return candidates

    def _calls(self, candidates: list[_Candidate]) -> list[list[_Candidate]]:
        """Candidates of one prompt (same image and instruction), cut into calls of candidates_per_call."""
        groups: dict[tuple[str, str, str], list[_Candidate]] = {}
        for c in candidates:
            groups.setdefault((c.prompt_id, c.image_url, c.instruction), []).append(c)
        size = self.candidates_per_call
        return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]

    async def _rate_all(self, candidates: list[_Candidate]) -> dict[str, Ratings]:
        gate = asyncio.Semaphore(self.concurrency)
        rated: dict[str, Ratings] = {}
        # The client is made inside the running loop: its connection pool belongs to that loop.
        async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                      timeout=self.timeout) as client:
            try:
                async with asyncio.TaskGroup() as tasks:  # a JudgeError cancels the rest
                    for call in self._calls(candidates):
                        tasks.create_task(self._rate_call(client, gate, call, rated))
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
        return rated

    async def _rate_call(self, client: openai.AsyncOpenAI, gate: asyncio.Semaphore, call: list[_Candidate],
                         rated: dict[str, Ratings]) -> None:
        """Rate one call's candidates; each attempt asks again only for those still unrated. Transport
        failures are retried by the client, replies that leave candidates unrated here, from one
        budget (`Budget`); a transport error that outlasts the client's retries spends it."""
        pending = list(call)
        budget, retry_number = Budget(self.retry.max_retries), 0
        while True:
            try:
                async with gate:
                    reply = await self._request(client, pending, budget)
                found = parse_ratings(reply, len(pending))
                for number, ratings in found.items():
                    candidate = pending[number - 1]
                    rated[candidate.key] = ratings
                    if self.cache is not None:
                        self.cache.put(candidate.key, ratings, self.model)
                self._counts["rated"] += len(found)
                pending = [c for number, c in enumerate(pending, start=1) if number not in found]
                if not pending:
                    return
                problem = f"reply rated {len(found)} of {len(found) + len(pending)} responses"
            except Exception as caught:  # noqa: BLE001 (classified just below)
                if not is_retryable(caught):
                    raise JudgeError(f"{self.name}: prompt {call[0].prompt_id}: "
                                     f"{describe_error(caught, self._api_key)}") from None
                problem = describe_error(caught, self._api_key)
                if not isinstance(caught, ValueError):  # transport: the client retried it with the budget left
                    budget.left = 0
            if budget.left <= 0:
                break
            budget.left -= 1
            pause = self.retry.delay(retry_number)
            retry_number += 1
            log.warning("%s: prompt %s: %s; retrying in %.2f s (%d retries left)", self.name, call[0].prompt_id,
                        problem, pause, budget.left)
            await asyncio.sleep(pause)
        log.warning("%s: prompt %s: %d response(s) left unrated after %d attempts (%s)", self.name,
                    call[0].prompt_id, len(pending), self.retry.max_retries + 1, problem)

    async def _request(self, client: openai.AsyncOpenAI, pending: list[_Candidate], budget: Budget) -> str:
        first = pending[0]
        try:
            raw = await budget.client(client).chat.completions.with_raw_response.create(
                model=self.model, temperature=0.0, max_tokens=self.max_tokens_per_rating * len(pending) + 40,
                messages=rubric_messages(first.image_url, first.instruction, [c.response for c in pending]),
            )
        except Exception as error:  # every attempt the client made failed: one, or the budget's
            sent = budget.left + 1 if is_retryable(error) else 1
            self._counts["requests"] += sent
            self._counts["failed_requests"] += sent
            raise
        budget.took(raw)
        self._counts["requests"] += 1 + raw.retries_taken
        self._counts["failed_requests"] += raw.retries_taken
        completion = raw.parse()
        if not isinstance(completion, ChatCompletion):  # a non-JSON 200 comes back as its text
            raise MalformedReply("the reply is not a chat completion")
        if completion.usage is not None:
            self._counts["prompt_tokens"] += completion.usage.prompt_tokens or 0
            self._counts["completion_tokens"] += completion.usage.completion_tokens or 0
        if not getattr(completion, "choices", None):
            return ""  # a reply with no choices rates nothing: retried like any unreadable reply
        return completion.choices[0].message.content or ""
