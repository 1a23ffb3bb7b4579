"""Benchmarks rated by a model judge (IFT's content check, the preference test) when the judge fails
for some answers: counted unrated, never invented, and rated by the next run once it recovers."""
import json
from pathlib import Path

import pytest

from m3po_core.stages import base_models, benchmarks, evaluate as evaluate_step, prompts
from m3po_core.config import load_config
from m3po_core.store import RunStore
from openai_server import Fault, Reply, openai_server  # noqa: F401 (the fixture)

TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.slow


def rate_everything_7(body: dict) -> list[Reply]:
    return [Reply(content=json.dumps({"relevance": 7, "accuracy": 7, "adherence": 7}))]


def test_answers_the_judge_left_unrated_are_rated_by_a_rerun(openai_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval")
    openai_server.responder = rate_everything_7
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                             "evaluation.benchmarks=[ift]"])
    store = RunStore(str(tmp_path), "e1")
    prompts.prepare_prompts(cfg, store)
    model_ref = base_models.ensure_base_model(cfg, store)
    questions = benchmarks.benchmark_questions(cfg, store, "ift")
    down = questions[1]["instruction"]
    openai_server.fail_when(down, Fault("status", status=503, headers={"retry-after-ms": "5"}))

    first = evaluate_step.evaluate_base(cfg, store, model_ref)["metrics"]["ift"]
    assert first["n"] == len(questions) and first["unrated"] == 1
    ratings = store.read_table("eval/ratings-base-ift.parquet").column("overall").to_pylist()
    assert ratings[1] is None and all(r is not None for i, r in enumerate(ratings) if i != 1)

    openai_server.heal()
    asked = len(openai_server.requests)
    second = evaluate_step.evaluate_base(cfg, store, model_ref)["metrics"]["ift"]
    assert second["unrated"] == 0 and second["n"] == first["n"]
    retried = openai_server.requests[asked:]
    assert len(retried) == 1 and down in retried[0].text          # the others come from the judge's cache
    rated = store.read_table("eval/ratings-base-ift.parquet").to_pylist()
    assert rated[1]["accuracy"] == pytest.approx(6 / 9) and all(r["overall"] is not None for r in rated)
    assert second["by_type"]["judge_accuracy"] == 1.0      # 7/10 passes the content check (accuracy >= 0.5)

    assert evaluate_step.evaluate_base(cfg, store, model_ref)["metrics"]["ift"] == second   # done: no request
    assert len(openai_server.requests) == asked + 1


def test_a_judge_that_never_rates_an_answer_stops_being_asked_after_the_attempts(openai_server, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    from m3po_core.store import RATING_ATTEMPTS

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval")
    openai_server.responder = rate_everything_7
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                             "evaluation.benchmarks=[ift]", "evaluation.max_new_tokens=4"])
    store = RunStore(str(tmp_path), "e2")
    prompts.prepare_prompts(cfg, store)
    model_ref = base_models.ensure_base_model(cfg, store)
    down = benchmarks.benchmark_questions(cfg, store, "ift")[0]["instruction"]
    openai_server.fail_when(down, Fault("malformed_body"))           # never readable
    for attempt in range(1, RATING_ATTEMPTS + 2):
        asked = len(openai_server.requests)
        record = evaluate_step.evaluate_base(cfg, store, model_ref)
        assert record["metrics"]["ift"]["unrated"] == 1
        if attempt <= RATING_ATTEMPTS:
            assert record["attempts"] == attempt and len(openai_server.requests) > asked
        else:                                                            # kept as it is: no more requests
            assert len(openai_server.requests) == asked
