"""Ensembles of judges (two OpenAI-protocol judges on loopback) and of encoders (CLIP + BLIP-2)."""
import json

import numpy as np
import pytest
from PIL import Image

from m3po_core.config import ConfigError, load_config
from m3po_core.scoring.ensemble import EncoderEnsemble, JudgeEnsemble
from m3po_core.scoring.judge import JudgeItem, weighted_score
from m3po_core.scoring.mas import make_judge
from openai_server import FakeOpenAIServer, Reply, request_text
from pathlib import Path

TINY = Path(__file__).parent / "tiny.yaml"


def constant_judge(relevance: int, accuracy: int, adherence: int, refuse: str | None = None):
    """A judge server answering the same 1-10 ratings to every request; unreadable for `refuse`."""
    def respond(body):
        if refuse and refuse in request_text(body):
            return [Reply(content="I cannot rate this.")]
        return [Reply(content=json.dumps({"relevance": relevance, "accuracy": accuracy, "adherence": adherence}))]
    return FakeOpenAIServer(respond).start()


def test_judges_are_averaged_over_those_that_rated(monkeypatch):
    monkeypatch.setenv("JUDGE_A_KEY", "sk-a")
    a, b = constant_judge(10, 10, 10), constant_judge(1, 4, 7, refuse="second")
    try:
        cfg = load_config(TINY, ["scoring.judge=openai:judge-a", f"scoring.judge_base_url={a.base_url}",
                                 "scoring.judge_api_key_env=JUDGE_A_KEY",
                                 f"scoring.extra_judges=[{{judge: 'openai:judge-b', base_url: '{b.base_url}'}}]"])
        judge = make_judge(cfg.scoring)
        assert isinstance(judge, JudgeEnsemble)
        from m3po_core.openai_http import RetryPolicy

        for j in judge.judges:
            j.retry = RetryPolicy(max_retries=1, backoff_base=0.01, backoff_max=0.02)
        img = Image.new("RGB", (8, 8), "red")
        items = [JudgeItem("p0", "what is it?", "the first answer", image=img),
                 JudgeItem("p0", "what is it?", "the second answer", image=img)]
        first, second = judge.score(items)
        # both rated the first: each aspect the mean of (1, 1, 1) and (0, 1/3, 2/3)
        assert (first.relevance, first.accuracy, first.adherence) == pytest.approx((0.5, 2 / 3, 5 / 6))
        assert first.overall == pytest.approx(weighted_score(0.5, 2 / 3, 5 / 6).overall)
        # judge b could not rate the second (retried, then missing): judge a's rating alone
        assert (second.relevance, second.accuracy, second.adherence) == (1.0, 1.0, 1.0)
        assert {r.body["model"] for r in a.requests} == {"judge-a"} and {r.body["model"] for r in b.requests} == {"judge-b"}
        assert judge.usage["requests"] == len(a.requests) + len(b.requests)
    finally:
        a.stop()
        b.stop()


def test_an_ensemble_judge_must_be_a_model_judge():
    with pytest.raises(ConfigError, match=r"scoring.extra_judges\[0\].judge"):
        load_config(TINY, ["scoring.extra_judges=[{judge: reference}]"])
    with pytest.raises(ConfigError, match=r"scoring.extra_encoders\[0\].name"):
        load_config(TINY, ["scoring.extra_encoders=[{name: m3po-tiny-clip}]"])


def test_encoders_are_averaged_on_the_unit_scale():
    class Fixed:
        def __init__(self, raw, unit):
            self.raw, self.unit_scores, self.n_image_encodes = raw, unit, 0

        def score(self, images, texts):
            self.n_image_encodes += len(images)
            return [np.array(self.raw[: len(t)]) for t in texts]

    cosine = Fixed([-1.0, 0.0, 1.0], lambda c: (c + 1) / 2)       # a CLIP: cosines
    probability = Fixed([0.2, 0.2, 0.2], lambda p: p)              # a BLIP-2 ITM: probabilities
    ensemble = EncoderEnsemble([cosine, probability])
    [scores] = ensemble.score([Image.new("RGB", (4, 4))], [["a", "b", "c"]])
    np.testing.assert_allclose(scores, [(0 + 0.2) / 2, (0.5 + 0.2) / 2, (1 + 0.2) / 2])
    assert ensemble.unit_scores(scores) is scores and ensemble.n_image_encodes == 2
