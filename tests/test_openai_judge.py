"""OpenAIJudge against a real HTTP server speaking the chat-completions protocol (tests/openai_server.py).

Each test response reads "rel=R acc=A adh=D"; the server's judge answers those numbers, so every
rating can be traced back to the response it belongs to.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import traceback
from pathlib import Path

import pytest
from PIL import Image

from m3po_core.scoring.judge import JudgeItem, weighted_score
from m3po_core.scoring.mas import make_judge
from m3po_core.scoring.openai_judge import RUBRIC_VERSION, JudgeError, OpenAIJudge, parse_ratings
from openai_server import FakeOpenAIServer, Fault, Reply, request_text
from openai_server import openai_server  # noqa: F401 (the fixture)

SECRET = "sk-test-SECRET123"
_RESPONSE = re.compile(r"rel=(\d+) acc=(\d+) adh=(\d+)")


def rubric_responder(body: dict) -> list[Reply]:
    """A judge that rates each response with the numbers written in it, in the rubric's JSON format."""
    text = request_text(body)
    found = _RESPONSE.findall(text)
    if "Responses (" in text:
        ratings = [{"id": i, "relevance": int(r), "accuracy": int(a), "adherence": int(d)}
                   for i, (r, a, d) in enumerate(found, start=1)]
        return [Reply(content="Here you go:\n```json\n" + json.dumps({"ratings": ratings}) + "\n```")]
    r, a, d = found[0]
    return [Reply(content=json.dumps({"relevance": int(r), "accuracy": int(a), "adherence": int(d)}))]


@pytest.fixture
def server(openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAIServer:  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.responder = rubric_responder
    return openai_server


def image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


def item(prompt_id: str, response: str, img: Image.Image | None = None) -> JudgeItem:
    return JudgeItem(prompt_id=prompt_id, instruction=f"What is in image {prompt_id}?", response=response,
                     image=img if img is not None else image())


def judge(server: FakeOpenAIServer, **kwargs) -> OpenAIJudge:
    settings = dict(base_url=server.base_url, max_retries=2, timeout=5.0, backoff_base=0.01, backoff_max=0.05)
    return OpenAIJudge("gpt-test", **{**settings, **kwargs})


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply", [
    '{"relevance": 7, "accuracy": 4, "adherence": 10}',
    'Sure! ```json\n{"Visual_Relevance": "7", "Semantic Accuracy": 4.0, "instruction-adherence": "10/10"}\n```',
    'My ratings are {"visual relevance": 7, "accuracy": {"score": 4}, "instruction following": 10}. Thanks.',
    '{"ratings": [{"id": 1, "relevance": 7, "accuracy": 4, "adherence": 10}]}',
])
def test_parser_reads_tolerantly(reply: str) -> None:
    assert parse_ratings(reply, 1) == {1: (7.0, 4.0, 10.0)}


@pytest.mark.parametrize("reply", [
    '{"relevance": 0, "accuracy": 4, "adherence": 10}',  # out of range
    '{"relevance": 11, "accuracy": 4, "adherence": 10}',
    '{"relevance": 7, "accuracy": 4}',  # an axis missing
    '{"relevance": true, "accuracy": 4, "adherence": 10}',
    'I would say seven, four and ten.',
    '{"relevance": 7, "accuracy": ',
])
def test_parser_rejects_invalid_ratings(reply: str) -> None:
    assert parse_ratings(reply, 1) == {}


def test_parser_multi_candidate_shapes() -> None:
    listed = '{"ratings": [{"id": "2", "relevance": 3, "accuracy": 3, "adherence": 3}, ' \
             '{"id": 5, "relevance": 1, "accuracy": 1, "adherence": 1}]}'
    assert parse_ratings(listed, 3) == {2: (3.0, 3.0, 3.0)}  # id 5 is not one of the 3 responses
    keyed = '{"response_1": {"relevance": 2, "accuracy": 2, "adherence": 2}, ' \
            '"response_2": {"relevance": 9, "accuracy": 9, "adherence": 99}}'
    assert parse_ratings(keyed, 2) == {1: (2.0, 2.0, 2.0)}  # id 2 has an invalid rating


# ---------------------------------------------------------------- requests and ratings


def test_ratings_are_mapped_to_unit_scores_and_the_image_sent(server: FakeOpenAIServer) -> None:
    img = image("blue")
    [score] = judge(server).score([item("p0", "rel=10 acc=1 adh=4", img)])
    assert (score.relevance, score.accuracy, score.adherence) == (1.0, 0.0, pytest.approx(1 / 3))
    assert score.overall == pytest.approx(weighted_score(1.0, 0.0, 1 / 3).overall)

    [request] = server.requests
    assert request.body["model"] == "gpt-test"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    [url] = request.image_urls
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.convert("RGB").tobytes() == img.tobytes()
    assert "What is in image p0?" in request.text and "rel=10 acc=1 adh=4" in request.text


def test_multi_candidate_calls_send_each_image_once_per_call(server: FakeOpenAIServer) -> None:
    items = [item(p, f"rel={k + 1} acc={k + 2} adh={k + 3} ({p})", image(colour))
             for p, colour in (("p0", "red"), ("p1", "green")) for k in range(5)]
    scores = judge(server, candidates_per_call=3).score(items)

    assert len(server.requests) == 4  # per prompt: ceil(5 / 3) calls
    for request in server.requests:
        assert len(request.image_urls) == 1
        prompt_ids = set(re.findall(r"\((p\d)\)", request.text))
        assert len(prompt_ids) == 1  # never two prompts in one call
    assert sorted(len(_RESPONSE.findall(r.text)) for r in server.requests) == [2, 2, 3, 3]
    for k, score in enumerate(scores[:5]):
        assert score.relevance == pytest.approx(k / 9) and score.adherence == pytest.approx((k + 2) / 9)


def test_a_candidate_left_out_of_a_multi_reply_is_asked_again_alone(server: FakeOpenAIServer) -> None:
    partial = '{"ratings": [{"id": 1, "relevance": 5, "accuracy": 5, "adherence": 5}]}'
    server.fail_request(1, Fault("content", content=partial))
    scores = judge(server, candidates_per_call=2).score([item("p0", "rel=2 acc=2 adh=2"),
                                                          item("p0", "rel=8 acc=8 adh=8")])
    assert [s.accuracy for s in scores] == [pytest.approx(4 / 9), pytest.approx(7 / 9)]
    assert len(server.requests) == 2
    assert _RESPONSE.findall(server.requests[1].text) == [("8", "8", "8")]


def test_rate_limit_then_success_is_rated_after_two_requests(server: FakeOpenAIServer) -> None:
    server.fail_request(1, Fault("status", status=429, headers={"retry-after-ms": "20"}))
    [score] = judge(server).score([item("p0", "rel=10 acc=10 adh=10")])
    assert score is not None and score.overall == pytest.approx(1.0)
    assert len(server.requests) == 2


def test_persistent_server_error_gives_none_after_all_attempts(server: FakeOpenAIServer) -> None:
    server.fail_when("rel=3", Fault("status", status=500))
    scores = judge(server, max_retries=3).score([item("p0", "rel=10 acc=10 adh=10"), item("p1", "rel=3 acc=3 adh=3"),
                                                 item("p2", "rel=1 acc=1 adh=1")])
    assert scores[1] is None
    assert len(server.requests_containing("rel=3")) == 4  # max_retries + 1
    assert scores[0].overall == pytest.approx(1.0) and scores[2].overall == pytest.approx(0.0)


def test_service_unavailable_and_timeout_are_retried(server: FakeOpenAIServer) -> None:
    server.fail_request(1, Fault("delay", seconds=1.5))
    server.fail_request(2, Fault("status", status=503, headers={"retry-after": "0"}))
    [score] = judge(server, timeout=0.3).score([item("p0", "rel=4 acc=4 adh=4")])
    assert score is not None and score.accuracy == pytest.approx(3 / 9)
    assert len(server.requests) == 3


@pytest.mark.parametrize("fault", [Fault("malformed_body"), Fault("content", content="Great answer, 9 out of 10!")])
def test_unreadable_replies_are_retried_then_missing(server: FakeOpenAIServer, fault: Fault) -> None:
    server.fail_when("rel=6", fault)
    server.fail_when("rel=7", fault, times=1)  # once only: the retry rates it
    scores = judge(server, max_retries=2).score([item("p0", "rel=6 acc=6 adh=6"), item("p1", "rel=7 acc=7 adh=7")])
    assert scores[0] is None and len(server.requests_containing("rel=6")) == 3
    assert scores[1].accuracy == pytest.approx(6 / 9) and len(server.requests_containing("rel=7")) == 2


def test_non_retryable_error_stops_the_judge(server: FakeOpenAIServer) -> None:
    server.fail_when("rel=1", Fault("status", status=401))
    with pytest.raises(JudgeError, match="401"):
        judge(server).score([item("p0", "rel=1 acc=1 adh=1")])
    assert len(server.requests) == 1


def test_concurrency_is_bounded(server: FakeOpenAIServer) -> None:
    server.latency = 0.1
    judge(server, concurrency=2).score([item(f"p{i}", f"rel={i + 1} acc=1 adh=1") for i in range(6)])
    assert server.max_in_flight == 2


# ---------------------------------------------------------------- cache, usage, secrets


def test_cached_ratings_make_no_request(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.fail_when("rel=9", Fault("status", status=500))
    items = [item("p0", "rel=2 acc=3 adh=4"), item("p0", "rel=9 acc=9 adh=9"), item("p1", "rel=5 acc=5 adh=5")]
    first = judge(server, cache_dir=str(tmp_path), max_retries=0).score(items)
    assert first[1] is None and len(server.requests) == 3

    again = judge(server, cache_dir=str(tmp_path), max_retries=0)
    second = again.score(items)
    assert second == first
    assert len(server.requests) == 4  # only the unrated candidate went out again
    assert server.requests[-1].text.count("rel=9") == 1
    assert again.usage["cache_hits"] == 2
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 2  # only successful ratings are cached
    record = json.loads(files[0].read_text())
    assert record["rubric"] == RUBRIC_VERSION and record["model"] == "gpt-test"


def test_usage_counts_requests_tokens_and_cost(server: FakeOpenAIServer) -> None:
    server.fail_request(1, Fault("status", status=500))
    rater = judge(server, price_per_1k_input=2.0, price_per_1k_output=10.0)
    rater.score([item("p0", "rel=2 acc=3 adh=4"), item("p1", "rel=2 acc=3 adh=5")])
    usage = rater.usage
    assert usage["requests"] == 3 and usage["failed_requests"] == 1
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 0
    assert usage["cost"] == pytest.approx((usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 10.0) / 1000)
    assert judge(server).usage["cost"] is None


def test_the_api_key_never_leaks(server: FakeOpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.fail_when("rel=3", Fault("status", status=500))
    server.fail_when("rel=4", Fault("malformed_body"))
    server.fail_when("rel=1", Fault("status", status=401))
    rater = judge(server, cache_dir=str(tmp_path), max_retries=1)
    rater.score([item("p0", "rel=2 acc=2 adh=2"), item("p1", "rel=3 acc=3 adh=3"), item("p2", "rel=4 acc=4 adh=4")])
    with pytest.raises(JudgeError) as error:
        rater.score([item("p3", "rel=1 acc=1 adh=1")])

    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # it was really used
    assert "SECRET123" not in "".join(traceback.format_exception(error.value))
    assert "SECRET123" not in repr(rater) and "SECRET123" not in str(rater.usage)
    assert "SECRET123" not in caplog.text and "retrying" in caplog.text  # the retries were logged
    cached = list(tmp_path.rglob("*"))
    assert any(p.is_file() for p in cached)
    assert all("SECRET123" not in p.read_text() for p in cached if p.is_file())


def test_missing_key_is_named_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="MY_JUDGE_KEY"):
        OpenAIJudge("gpt-test", api_key_env="MY_JUDGE_KEY")


# ---------------------------------------------------------------- calling contexts and registration


def test_score_works_from_a_thread_and_inside_a_running_loop(server: FakeOpenAIServer) -> None:
    rater = judge(server)
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(rater.score([item("p0", "rel=10 acc=1 adh=1")])))
    worker.start()
    worker.join()

    async def from_async_code():
        return rater.score([item("p1", "rel=1 acc=10 adh=1")])

    results += asyncio.run(from_async_code())
    assert [r.relevance for r in results] == [1.0, 0.0]


def test_make_judge_builds_the_openai_judge(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from m3po_core.config import ScoringConfig

    built = make_judge(ScoringConfig(judge="openai:gpt-4o", judge_base_url=server.base_url))
    assert isinstance(built, OpenAIJudge) and built.name == "openai:gpt-4o" and built.base_url == server.base_url
