"""The scoring stage with a model judge: the OpenAI-compatible judge on a loopback server speaking
the chat-completions protocol, selected by the run configuration."""
import json
from pathlib import Path

import pyarrow as pa
import pytest

from m3po_core import schema
from m3po_core.stages import base_models, prompts as prompts_step, score
from m3po_core.config import load_config
from m3po_core.store import RunStore
from openai_server import Reply, openai_server  # noqa: F401 (the fixture)

TINY = Path(__file__).parent / "tiny.yaml"
SECRET = "sk-test-SECRET-stage"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One store root for the module's runs: the tiny CLIP is built once, under its `_models/`."""
    return tmp_path_factory.mktemp("runs")


def rate_yes_high(body: dict) -> list[Reply]:
    text = json.dumps(body["messages"])
    r = 10 if "yes ," in text else 2
    return [Reply(content=json.dumps({"relevance": r, "accuracy": r, "adherence": r}))]


def _marked_candidates(store: RunStore, prompts: list[dict], tag: str) -> list[dict]:
    """Two candidates per prompt, published as candidates shard 0, each carrying a marker
    <{tag}prompt_id#j> so that faults and requests name their candidate."""
    rows = [{"prompt_id": p["prompt_id"], "cand_idx": j, "text": f"{text} <{tag}{p['prompt_id']}#{j}>", "token_ids": [1],
             "logp_sum": -1.0, "logp_mean": -1.0, "n_tokens": 1, "finish_reason": "stop", "sampler": "test", "seed": 0}
            for p in prompts for j, text in enumerate(["yes , it is .", "no , it is not ."])]
    store.publish_shard("candidates", 0, pa.Table.from_pylist(rows, schema.CANDIDATES), schema.CANDIDATES, key="c")
    return rows


def test_score_shard_with_the_openai_judge(openai_server, root, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.responder = rate_yes_high
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                             "scoring.clip_weight=0.0", "scoring.judge_weight=1.0",
                             "scoring.judge_price_per_1k_input=1.0", "scoring.judge_price_per_1k_output=2.0"])
    store = RunStore(str(root), "j1")
    prompts_step.prepare_prompts(cfg, store)
    prompts = prompts_step.read_prompts_shard(store, 0)
    rows = [{"prompt_id": p["prompt_id"], "cand_idx": j, "text": text, "token_ids": [1], "logp_sum": -1.0,
             "logp_mean": -1.0, "n_tokens": 1, "finish_reason": "stop", "sampler": "test", "seed": 0}
            for p in prompts for j, text in enumerate(["yes , it is .", "no , it is not ."])]
    store.publish_shard("candidates", 0, pa.Table.from_pylist(rows, schema.CANDIDATES), schema.CANDIDATES, key="c")
    clip_ref = base_models.ensure_clip(cfg, store)

    result = score.score_shard(cfg, store, 0, clip_ref)
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

    again = score.score_shard(cfg, store, 0, clip_ref)                  # complete under its key: skipped
    assert again.cached and len(openai_server.requests) == len(rows)


def test_candidates_left_unrated_are_retried_by_a_rerun(openai_server, root, monkeypatch, capsys):  # noqa: F811
    """A judge outage leaves some candidates unrated (NaN): the shard is published, but a re-run
    computes it again and asks the judge only for those; once all are rated it is skipped."""
    from m3po.flows.cli import _status
    from m3po_core.report import judge_usage_line
    from openai_server import Fault

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.responder = rate_yes_high
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}"])
    store = RunStore(str(root), "j2")
    prompts_step.prepare_prompts(cfg, store)
    prompts = prompts_step.read_prompts_shard(store, 0)
    rows = _marked_candidates(store, prompts, "")
    clip_ref = base_models.ensure_clip(cfg, store)
    down = [f"<{prompts[0]['prompt_id']}#1>", f"<{prompts[2]['prompt_id']}#0>", f"<{prompts[3]['prompt_id']}#1>"]
    for marker in down:  # every attempt fails (a short Retry-After keeps the judge's retries fast)
        openai_server.fail_when(marker, Fault("status", status=503, headers={"retry-after-ms": "5"}))

    def judged() -> dict[str, float | None]:
        table = store.read_table(RunStore.shard_rel("scores", 0)).to_pylist()
        return {f"<{s['prompt_id']}#{s['cand_idx']}>": s["judge"] for s in table}

    first = score.score_shard(cfg, store, 0, clip_ref)
    assert not first.cached and first.rows == len(rows)
    assert sorted(m for m, j in judged().items() if j is None) == sorted(down)   # missing, never invented
    entry = store.shard_entry("scores", 0)
    assert entry["state"] == "complete" and entry["unrated"] == 3 and entry["judge_usage"]["unrated"] == 3
    assert entry["attempts"] == 1
    assert "3 candidates left unrated (a re-run retries them)" in judge_usage_line(store)
    assert _status(str(root), "j2") == 0
    assert "shard 0: complete, 3 unrated: re-run to retry" in capsys.readouterr().out

    spent = entry["judge_usage"]
    assert spent["requests"] == len(openai_server.requests) and spent["failed_requests"] > 0
    openai_server.heal()                                                  # the service has recovered
    before = len(openai_server.requests)
    second = score.score_shard(cfg, store, 0, clip_ref)
    assert not second.cached                                              # not done: recomputed
    retried = openai_server.requests[before:]
    assert sorted(m for r in retried for m in down if m in r.text) == sorted(down) and len(retried) == 3
    assert all(j is not None for j in judged().values()) and len(judged()) == len(rows)
    entry = store.shard_entry("scores", 0)
    assert entry["unrated"] == 0 and entry["attempts"] == 2  # the rated ones kept from the published shard
    # what the failed attempts spent stays in the record (the report's requests and tokens)
    assert entry["judge_usage"]["requests"] == spent["requests"] + 3
    assert entry["judge_usage"]["prompt_tokens"] > spent["prompt_tokens"]
    assert _status(str(root), "j2") == 0 and "unrated" not in capsys.readouterr().out

    third = score.score_shard(cfg, store, 0, clip_ref)                   # done now: skipped, no request
    assert third.cached and len(openai_server.requests) == before + 3


def test_a_failed_retry_keeps_the_published_shard_and_its_spending(openai_server, root, monkeypatch, capsys):  # noqa: F811
    """A shard published with unrated candidates is retried by a re-run; if that retry fails (the
    key was revoked: 401), the published file, its record and what the judge already cost stay as
    they were, and the record says why the retry failed."""
    from m3po.flows.cli import _status
    from openai_server import Fault

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.heal()
    openai_server.responder = rate_yes_high
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}"])
    store = RunStore(str(root), "j3")
    prompts_step.prepare_prompts(cfg, store)
    prompts = prompts_step.read_prompts_shard(store, 0)
    rows = _marked_candidates(store, prompts, "j3:")  # its own markers: the judge's cache holds j2's ratings
    clip_ref = base_models.ensure_clip(cfg, store)
    openai_server.fail_when(f"<j3:{prompts[1]['prompt_id']}#0>", Fault("status", status=503, headers={"retry-after-ms": "5"}))
    score.score_shard(cfg, store, 0, clip_ref)
    published = store.shard_entry("scores", 0)
    data = Path(store.path(RunStore.shard_rel("scores", 0))).read_bytes()
    assert published["unrated"] == 1 and published["judge_usage"]["requests"] > 0

    openai_server.heal()
    openai_server.fail_when("", Fault("status", status=401))          # every request: the key was revoked
    with pytest.raises(Exception, match="401"):
        score.score_shard(cfg, store, 0, clip_ref)
    kept = store.shard_entry("scores", 0)
    assert Path(store.path(RunStore.shard_rel("scores", 0))).read_bytes() == data
    assert {k: v for k, v in kept.items() if k != "last_retry"} == published
    assert "401" in kept["last_retry"]["error"] and kept["last_retry"]["key"] == published["key"]
    assert SECRET not in json.dumps(kept)
    assert _status(str(root), "j3") == 0
    assert "complete (kept as published); a retry failed:" in capsys.readouterr().out
    openai_server.heal()


def test_a_judge_budget_stops_scoring_cleanly_and_a_larger_one_continues(openai_server, root, monkeypatch, capsys):  # noqa: F811
    """`scoring.max_judge_requests`: the judge gets exactly the budget's requests over the run's
    shards; the candidates past it are unrated and counted apart (never invented); a re-run with the
    same budget sends nothing, one with a larger budget rates only what is left."""
    from m3po.flows.cli import _status
    from m3po_core.scoring.budget import projection, run_spend

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.heal()
    openai_server.responder = rate_yes_high
    base = ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}"]
    store = RunStore(str(root), "budget")
    cfg = load_config(TINY, [*base, "scoring.max_judge_requests=10"])
    prompts_step.prepare_prompts(cfg, store)
    from m3po_core.stages.runner import fingerprint

    rows = []
    for shard in (0, 1):  # 8 prompts x 2 candidates per shard: 32 candidates, a budget of 10 requests
        ps = prompts_step.read_prompts_shard(store, shard)
        marked = [{"prompt_id": p["prompt_id"], "cand_idx": j, "text": f"{t} <b{shard}:{p['prompt_id']}#{j}>",
                   "token_ids": [1], "logp_sum": -1.0, "logp_mean": -1.0, "n_tokens": 1, "finish_reason": "stop",
                   "sampler": "test", "seed": 0} for p in ps for j, t in enumerate(["yes , it is .", "no , it is not ."])]
        store.publish_shard("candidates", shard, pa.Table.from_pylist(marked, schema.CANDIDATES), schema.CANDIDATES,
                            key=fingerprint(shard))
        rows += marked
    clip_ref = base_models.ensure_clip(cfg, store)
    store.write_json("config.json", cfg.to_dict())
    for shard in (0, 1):
        score.score_shard(cfg, store, shard, clip_ref)
    assert len(openai_server.requests) == 10                              # the budget, exactly
    first, second = store.shard_entry("scores", 0), store.shard_entry("scores", 1)
    assert first["unrated_budget"] == 6 and first["unrated"] == 0 and second["unrated_budget"] == 16
    assert first["judge_budget"] == {"max_requests": 10, "max_cost": None}
    table = store.read_table(RunStore.shard_rel("scores", 0)).to_pylist()
    assert sum(r["judge"] is None and r["mas"] is None for r in table) == 6   # unrated: no MAS, nothing invented
    assert run_spend(store)["requests"] == 10
    assert "projection for 2 shards" in projection(first, 2, cfg.scoring)
    assert "~32 requests" in projection(first, 2, cfg.scoring)            # 10 for 10 of 16 rated: 32 for 32
    assert _status(str(root), "budget") == 0
    out = capsys.readouterr().out
    assert "judge spend: 10 of 10 requests" in out and "22 candidates unrated at the budget" in out

    for shard in (0, 1):                                                  # the same budget: nothing sent
        score.score_shard(cfg, store, shard, clip_ref)
    assert len(openai_server.requests) == 10 and store.shard_entry("scores", 1) == second

    larger = load_config(TINY, [*base, "scoring.max_judge_requests=40"])
    for shard in (0, 1):
        score.score_shard(larger, store, shard, clip_ref)
    assert len(openai_server.requests) == 32                              # only the 22 left
    for shard in (0, 1):
        entry = store.shard_entry("scores", shard)
        assert entry["unrated_budget"] == 0 and entry["attempts"] == 1
        table = store.read_table(RunStore.shard_rel("scores", shard)).to_pylist()
        assert all(r["judge"] is not None for r in table)
    assert run_spend(store)["requests"] == 32                            # every attempt's requests kept


def test_a_cost_budget_needs_prices_and_stops_at_the_cost(openai_server, root, monkeypatch):  # noqa: F811
    from m3po_core.errors import ConfigError

    with pytest.raises(ConfigError, match="scoring.max_judge_cost"):
        load_config(TINY, ["scoring.max_judge_cost=1.0"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    openai_server.heal()
    openai_server.responder = rate_yes_high
    cfg = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                             "scoring.judge_price_per_1k_input=1.0", "scoring.judge_price_per_1k_output=1.0"])
    store = RunStore(str(root), "cost")
    prompts_step.prepare_prompts(cfg, store)
    prompts = prompts_step.read_prompts_shard(store, 0)
    rows = _marked_candidates(store, prompts, "cost:")
    clip_ref = base_models.ensure_clip(cfg, store)
    before = len(openai_server.requests)
    score.score_shard(cfg, store, 0, clip_ref)                            # no budget: what one rating costs
    per_rating = store.shard_entry("scores", 0)["judge_usage"]["cost"] / len(rows)
    budget = per_rating * 9.5                                             # pays for 9 ratings, not 10
    capped = load_config(TINY, ["scoring.judge=openai:judge-test", f"scoring.judge_base_url={openai_server.base_url}",
                                "scoring.judge_price_per_1k_input=1.0", "scoring.judge_price_per_1k_output=1.0",
                                f"scoring.max_judge_cost={budget}"])
    store2 = RunStore(str(root), "cost2")
    prompts_step.prepare_prompts(capped, store2)
    _marked_candidates(store2, prompts_step.read_prompts_shard(store2, 0), "cost2:")
    before = len(openai_server.requests)
    score.score_shard(capped, store2, 0, clip_ref)
    entry = store2.shard_entry("scores", 0)
    assert entry["judge_usage"]["cost"] <= budget
    assert len(openai_server.requests) - before == 9 and entry["unrated_budget"] == len(rows) - 9
