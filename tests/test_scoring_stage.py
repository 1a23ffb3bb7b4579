"""The scoring stage with a model judge: the OpenAI-compatible judge on a loopback server speaking
the chat-completions protocol, selected by the run configuration."""
import json
from pathlib import Path

import pyarrow as pa
import pytest

from m3po_core import schema, stages
from m3po_core.config import load_config
from m3po_core.store import RunStore
from openai_server import Reply, openai_server  # noqa: F401 (the fixture)

TINY = Path(__file__).parent / "tiny.yaml"
SECRET = "sk-test-SECRET-stage"


def rate_yes_high(body: dict) -> list[Reply]:
    text = json.dumps(body["messages"])
    r = 10 if "yes ," in text else 2
    return [Reply(content=json.dumps({"relevance": r, "accuracy": r, "adherence": r}))]


def test_score_shard_with_the_openai_judge(openai_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.responder = rate_yes_high
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                             "scoring.clip_weight=0.0", "scoring.judge_weight=1.0",
                             "scoring.judge_price_per_1k_input=1.0", "scoring.judge_price_per_1k_output=2.0"])
    store = RunStore(str(tmp_path), "j1")
    stages.prepare_prompts(cfg, store)
    prompts = stages.read_prompts_shard(store, 0)
    rows = [{"prompt_id": p["prompt_id"], "cand_idx": j, "text": text, "token_ids": [1], "logp_sum": -1.0,
             "logp_mean": -1.0, "n_tokens": 1, "finish_reason": "stop", "sampler": "test", "seed": 0}
            for p in prompts for j, text in enumerate(["yes , it is .", "no , it is not ."])]
    store.publish_shard("candidates", 0, pa.Table.from_pylist(rows, schema.CANDIDATES), schema.CANDIDATES, key="c")
    clip_ref = stages.ensure_clip(cfg, store)

    result = stages.score_shard(cfg, store, 0, clip_ref)
    scores = store.read_table(RunStore.shard_rel("scores", 0)).to_pylist()
    assert result.rows == len(rows) == len(scores)
    assert len(openai_server.requests) == len(rows)                      # one rating request per candidate
    assert [s["mas"] for s in scores] == pytest.approx([1.0 if s["cand_idx"] == 0 else 1 / 9 for s in scores])
    assert SECRET.encode() not in Path(store.path(RunStore.shard_rel("scores", 0))).read_bytes()
    cached = list(Path(store.shared_path("_judge_cache")).rglob("*.json"))
    assert cached and all(SECRET not in p.read_text() for p in cached)

    usage = store.shard_entry("scores", 0)["judge_usage"]                # what the shard cost, for the report
    assert usage["requests"] == len(rows) and usage["unrated"] == 0
    assert usage["cost"] == pytest.approx((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1000)
    from m3po_core.report import judge_usage_line
    assert f"{len(rows)} requests" in judge_usage_line(store) and "cost" in judge_usage_line(store)

    again = stages.score_shard(cfg, store, 0, clip_ref)                  # complete under its key: skipped
    assert again.cached and len(openai_server.requests) == len(rows)
