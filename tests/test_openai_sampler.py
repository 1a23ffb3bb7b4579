"""OpenAICompatibleSampler against a real HTTP server speaking the chat-completions protocol."""
from __future__ import annotations

import pytest
from PIL import Image

from m3po_core.sampling import SamplingParams
from m3po_core.sampling.openai_backend import OpenAICompatibleSampler, SamplingError
from openai_server import FakeOpenAIServer, Fault, Reply
from openai_server import openai_server  # noqa: F401 (the fixture)

# Choice j answers "answer j" in tokens 10+j, 20+j, then EOS (2) when it stops, with these logprobs.
LOGPROBS = [-0.5, -1.25, -0.125]


def vllm_responder(body: dict) -> list[Reply]:
    replies = []
    for j in range(body.get("n", 1)):
        stops = j % 2 == 0
        ids = [10 + j, 20 + j] + ([2] if stops else [])
        tokens = [(f"token_id:{i}", lp) for i, lp in zip(ids, LOGPROBS)]
        replies.append(Reply(content=f" answer {j} ", tokens=tokens, finish_reason="stop" if stops else "length"))
    return replies


@pytest.fixture
def server(openai_server: FakeOpenAIServer) -> FakeOpenAIServer:  # noqa: F811
    openai_server.responder = vllm_responder
    return openai_server


def sampler(server: FakeOpenAIServer, **kwargs) -> OpenAICompatibleSampler:
    settings = dict(max_retries=2, timeout=5.0, backoff_base=0.01, backoff_max=0.05)
    return OpenAICompatibleSampler("llava-hf/llava-1.5-7b-hf", server.base_url, **{**settings, **kwargs})


def prompts(count: int) -> tuple[list[Image.Image], list[str]]:
    return [Image.new("RGB", (8, 8), (i * 30, 0, 0)) for i in range(count)], [f"instruction {i}" for i in range(count)]


def test_candidates_carry_the_servers_tokens_and_logprobs(server: FakeOpenAIServer) -> None:
    images, instructions = prompts(2)
    params = SamplingParams(n=3, temperature=1.3, top_p=0.9, max_new_tokens=17)
    out = sampler(server).sample(images, instructions, params, seed=1000)

    assert [len(row) for row in out] == [3, 3]
    stopped, truncated = out[0][0], out[0][1]
    assert stopped.text == "answer 0" and stopped.token_ids == [10, 20, 2] and stopped.finish_reason == "stop"
    assert stopped.n_tokens == 3 and stopped.logp_sum == pytest.approx(sum(LOGPROBS))
    assert stopped.logp_mean == pytest.approx(sum(LOGPROBS) / 3) and stopped.seed == 1000
    assert truncated.token_ids == [11, 21] and truncated.finish_reason == "length"
    assert truncated.logp_sum == pytest.approx(-1.75) and truncated.n_tokens == 2

    bodies = sorted((r.body for r in server.requests), key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [1000, 1003]   # n = 3 apart: vLLM seeds choice j with seed + j
    for body, instruction in zip(bodies, instructions):
        assert body["model"] == "llava-hf/llava-1.5-7b-hf"
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (3, 1.3, 0.9, 17)
        assert body["logprobs"] is True and body["top_logprobs"] == 0
        assert body["return_tokens_as_token_ids"] is True
        image_part, text_part = body["messages"][0]["content"]
        assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert text_part == {"type": "text", "text": instruction}


def test_plain_token_strings_give_no_token_ids(server: FakeOpenAIServer) -> None:
    server.responder = lambda body: [Reply(content="yes .", tokens=[("yes", -0.1), (" .", -0.2)])] * body["n"]
    [[candidate, _]] = sampler(server).sample(*prompts(1), SamplingParams(n=2), seed=0)
    assert candidate.token_ids == [] and candidate.n_tokens == 2 and candidate.logp_sum == pytest.approx(-0.3)


def test_max_tokens_is_always_sent_and_greedy_reads_text(server: FakeOpenAIServer) -> None:
    texts = sampler(server).greedy(*prompts(2), max_new_tokens=9)
    assert texts == ["answer 0", "answer 0"]
    assert all(r.body["max_tokens"] == 9 and r.body["temperature"] == 0.0 for r in server.requests)


def test_concurrency_is_bounded(server: FakeOpenAIServer) -> None:
    server.latency = 0.1
    out = sampler(server, concurrency=3).sample(*prompts(9), SamplingParams(n=1), seed=0)
    assert len(out) == 9 and server.max_in_flight == 3


def test_rate_limits_and_timeouts_are_retried(server: FakeOpenAIServer) -> None:
    server.fail_when("instruction 0", Fault("status", status=429, headers={"retry-after-ms": "10"}), times=1)
    server.fail_when("instruction 1", Fault("delay", seconds=1.5), times=1)
    out = sampler(server, timeout=0.3).sample(*prompts(2), SamplingParams(n=2), seed=0)
    assert [len(row) for row in out] == [2, 2]
    assert len(server.requests_containing("instruction 0")) == 2
    assert len(server.requests_containing("instruction 1")) == 2


def test_a_prompt_failing_after_retries_fails_the_batch_naming_it(server: FakeOpenAIServer) -> None:
    server.fail_when("instruction 2", Fault("status", status=500))
    with pytest.raises(SamplingError, match=r"prompt 2 .*HTTP 500"):
        sampler(server, max_retries=3).sample(*prompts(4), SamplingParams(n=2), seed=0)
    assert len(server.requests_containing("instruction 2")) == 4  # max_retries + 1


def test_a_reply_without_logprobs_is_an_error(server: FakeOpenAIServer) -> None:
    server.responder = lambda body: [Reply(content="no logprobs here")] * body["n"]
    with pytest.raises(SamplingError, match="prompt 0 .*logprobs"):
        sampler(server, max_retries=0).sample(*prompts(1), SamplingParams(n=2), seed=0)
