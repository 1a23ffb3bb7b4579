"""Adaptive sampling (`sampling.adaptive`): the stopping rule on hand-made pools, and the rounds as
cached shard work on the tiny model: the same first candidates as fixed N, resume after an
interruption between rounds, a larger n that samples only what is new."""
from pathlib import Path

import pyarrow as pa
import pytest

from m3po_core.adaptive import n_rounds, round_span, settled
from m3po_core.config import load_config
from m3po_core.stages import base_models, prompts as prompts_step, sample
from m3po_core.stages.select import shard_candidates_with_scores
from m3po_core.store import RunStore, round_stage

TINY = Path(__file__).parent / "tiny.yaml"


def pool(rows: list[tuple[str, int, float, float]]) -> pa.Table:
    """(prompt, cand_idx, mas, logp) rows; the judge's rating is the MAS."""
    p, c, m, lp = zip(*rows)
    return pa.table({"prompt_id": list(p), "cand_idx": list(c), "mas": list(m), "judge": list(m), "logp": list(lp),
                     "perturbation": [""] * len(p)})


RULE = dict(settle_gap=0.3, settle_rounds=2, strategy="m3po", alpha=0.5, delta=0.1)


def test_a_clear_pair_with_a_confident_wrong_answer_settles_in_the_first_round():
    t = pool([("a", 0, 0.9, -1.0), ("a", 1, 0.2, -0.95), ("a", 2, 0.85, -1.2)])  # wrong one as likely as the winner
    assert settled(t, rounds_done=1, **RULE) == {"a"}


def test_an_unlikely_wrong_answer_waits_a_round_then_the_gap_settles_it():
    t = pool([("a", 0, 0.9, -0.5), ("a", 1, 0.2, -2.0)])  # the wrong answer pays a confidence penalty
    assert settled(t, rounds_done=1, **RULE) == set()
    assert settled(t, rounds_done=2, **RULE) == {"a"}
    # the alpha = 0 strategies have no penalty: the gap alone, from the first round
    assert settled(t, rounds_done=1, **{**RULE, "strategy": "mas_gap"}) == {"a"}


def test_a_small_gap_never_settles_and_one_repeated_answer_stops_after_the_patience():
    close = pool([("a", 0, 0.9, -1.0), ("a", 1, 0.8, -1.0)])          # different answers, gap 0.1 < 0.3
    same = pool([("b", j, 0.7, -1.0) for j in range(8)])                # one answer, 8 times
    both = pa.concat_tables([close, same])
    assert settled(both, rounds_done=1, **RULE) == set()
    assert settled(both, rounds_done=2, **RULE) == {"b"}
    assert settled(both, rounds_done=5, **RULE) == {"b"}


def test_unrated_candidates_take_no_part():
    t = pool([("a", 0, 0.9, -1.0), ("a", 1, float("nan"), -1.0)])
    assert settled(t, rounds_done=3, **RULE) == set()  # one rated answer: neither a pair nor a repeated answer


def test_rounds_cover_the_budget():
    assert n_rounds(32, 8) == 4 and n_rounds(30, 8) == 4 and n_rounds(4, 8) == 1
    assert [round_span(r, 30, 8) for r in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 30)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adaptive")


def shard_tables(store: RunStore, shard: int = 0) -> dict[tuple[str, int], tuple]:
    t = shard_candidates_with_scores(store, shard, ["token_ids", "seed", "mas"])
    return {(p, c): (tuple(ids), seed, mas) for p, c, ids, seed, mas in
            zip(*(t.column(k).to_pylist() for k in ("prompt_id", "cand_idx", "token_ids", "seed", "mas")))}


def run_shard0(cfg, store: RunStore):
    prompts_step.prepare_prompts(cfg, store)
    model_ref = base_models.ensure_base_model(cfg, store)
    base_models.ensure_clip(cfg, store)
    return sample.sample_shard(cfg, store, 0, model_ref)


ADAPTIVE = ["sampling.adaptive=true", "sampling.n=12", "sampling.round_size=4", "sampling.temperature=1.3"]


def test_adaptive_rounds_draw_the_fixed_n_candidates_and_stop_early(root):
    fixed = RunStore(str(root), "fixed")
    run_shard0(load_config(TINY, ["sampling.seeding=candidate", "sampling.n=12", "sampling.temperature=1.3"]), fixed)
    from m3po_core.stages import score

    cfg_fixed = load_config(TINY, ["sampling.seeding=candidate", "sampling.n=12", "sampling.temperature=1.3"])
    score.score_shard(cfg_fixed, fixed, 0, base_models.ensure_clip(cfg_fixed, fixed))
    adaptive = RunStore(str(root), "adaptive")
    result = run_shard0(load_config(TINY, ADAPTIVE), adaptive)

    want, got = shard_tables(fixed), shard_tables(adaptive)
    assert set(got) <= set(want) and result.rows == len(got)
    # same tokens and seeds at the same indices; the same MAS up to float32 rounding: a round scores
    # 4 candidates per CLIP batch where fixed N scores 12, and some CPUs' kernels round by batch shape
    assert all(got[k][:2] == want[k][:2] for k in got)
    assert all(got[k][2] == pytest.approx(want[k][2], abs=1e-6) for k in got)
    per_prompt: dict[str, int] = {}
    for p, _ in got:
        per_prompt[p] = per_prompt.get(p, 0) + 1
    assert set(per_prompt.values()) <= {4, 8, 12} and min(per_prompt.values()) < 12  # some stopped early
    record = adaptive.shard_entry("candidates", 0)["adaptive"]
    assert sum(record["stopped_at"].values()) == len(per_prompt) and record["open"] == 0
    # the scores stage finds its shard complete under its own key: nothing to score again
    cfg = load_config(TINY, ADAPTIVE)
    assert score.score_shard(cfg, adaptive, 0, base_models.ensure_clip(cfg, adaptive)).cached
    # rounds after the first hold only the prompts still open
    firsts = adaptive.read_shard(round_stage("candidates", 0), 0).num_rows
    seconds = adaptive.read_shard(round_stage("candidates", 1), 0).num_rows
    assert firsts == 4 * len(per_prompt) and seconds == 4 * sum(v > 4 for v in per_prompt.values())


def test_an_interrupted_shard_resumes_at_its_round_and_a_larger_n_samples_only_what_is_new(root, monkeypatch, capsys):
    from m3po_core.stages import adaptive_rounds

    store = RunStore(str(root), "resume")
    cfg = load_config(TINY, ADAPTIVE)
    calls: list[tuple[int, int]] = []
    real = adaptive_rounds.sample_round

    def counted(cfg_, store_, model_ref, rows, images, first, end):
        calls.append((first, len(rows)))
        if first == 4 and len(calls) == 2 and not getattr(counted, "failed", False):
            counted.failed = True
            raise KeyboardInterrupt  # the run stops between rounds (Ctrl-C, a killed worker)
        return real(cfg_, store_, model_ref, rows, images, first, end)

    monkeypatch.setattr(adaptive_rounds, "sample_round", counted)
    with pytest.raises(KeyboardInterrupt):
        run_shard0(cfg, store)
    assert [c[0] for c in calls] == [0, 4]
    assert store.shard_entry(round_stage("candidates", 0), 0)["state"] == "complete"
    assert store.shard_entry(round_stage("candidates", 1), 0)["state"] == "failed"
    assert store.shard_entry("candidates", 0) is None
    # `m3po status` shows where the shard stopped: round 0 done, round 1 failed, nothing published
    from m3po_core.status import status

    capsys.readouterr()
    assert status(str(root), "resume") == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("candidates ") and "missing=3" in line for line in printed)
    assert any(line.startswith("rounds/candidates-r00") and "1 shards reached this round  complete=1" in line
               for line in printed)
    r01 = next(i for i, line in enumerate(printed) if line.startswith("rounds/candidates-r01"))
    assert "failed=1" in printed[r01] and "KeyboardInterrupt" in printed[r01 + 1]
    calls.clear()
    scored0 = store.shard_entry(round_stage("scores", 0), 0)
    run_shard0(cfg, store)
    assert calls and calls[0][0] == 4  # round 0 came from the store: only rounds 1.. were sampled
    assert store.shard_entry(round_stage("scores", 0), 0) == scored0  # and its scores were not computed again
    done = shard_tables(store)
    calls.clear()
    bigger = load_config(TINY, [*ADAPTIVE, "sampling.n=16"])
    run_shard0(bigger, store)
    assert calls and all(first == 12 for first, _ in calls)  # rounds 0-2 are the same: only round 3 is new
    after = shard_tables(store)
    assert all(after[k] == v for k, v in done.items())


def test_the_pipeline_samples_adaptively_and_reports_what_it_drew(root, capsys):
    """`m3po run` with sampling.adaptive and a judge budget: the scores stage finds every shard done
    by the rounds, the pilot shard's projection is printed before the others, and the report says
    how many candidates were drawn and what the judge was asked for against the budget."""
    from m3po.flows.pipeline import m3po_pipeline
    from m3po_core import progress

    cfg = load_config(TINY, [*ADAPTIVE, "scoring.max_judge_requests=100000"])
    progress.install(__import__("sys").stdout, live=False)
    try:
        out = m3po_pipeline(config=cfg.to_dict(), root=str(root), run_id="flow")
    finally:
        progress.uninstall()
    printed = capsys.readouterr().out
    assert "judge projection for 3 shards (from shard 0's measured usage)" in printed
    store = RunStore(str(root), "flow")
    report = Path(store.path("report.md")).read_text()
    drawn = sum(store.shard_entry("candidates", s)["rows"] for s in range(3))
    assert f"adaptive sampling (rounds of 4): {drawn} candidates" in report
    assert f"candidates per prompt: up to {cfg.sampling.n} " in report  # not N for every prompt
    assert f"judge spend: {drawn} of 100000 requests" in report  # one reference rating per candidate
    assert out["pairs"]["pairs"] > 0 and drawn < 24 * 12
    # the viewer lists every round with the shards that reached it, all complete here
    from viewer_server import get, serving

    reached = {stage: len(store.manifest(stage)) for stage in store.round_stages("candidates")}
    assert reached["rounds/candidates-r00"] == 3 and len(reached) >= 2
    with serving(str(root), "flow") as url:
        code, page = get(url + "/")
    assert code == 200
    for stage, n in reached.items():
        for kind in ("candidates", "scores"):
            section = page.split(f'id="stage-{stage.replace("candidates", kind).replace("/", "-")}"')[1].split("</section>")[0]
            assert f"{n} shards reached this round" in section and f"complete: {n}" in section


def test_the_judge_budget_ends_the_rounds_and_a_larger_budget_goes_on(root):
    """A budget reached in round 0: the shard is published with what was rated, the rest marked
    unrated at the budget (no MAS, nothing invented); a larger budget rates them and samples on."""
    store = RunStore(str(root), "budgeted")
    small = load_config(TINY, [*ADAPTIVE, "scoring.max_judge_requests=20"])
    run_shard0(small, store)
    scores = store.read_shard("scores", 0).to_pylist()
    record = store.shard_entry("scores", 0)
    assert len(scores) == 32 and record["unrated_budget"] == 12 and record["judge_usage"]["requests"] == 20
    assert sum(r["mas"] is None for r in scores) == 12
    assert store.shard_entry(round_stage("candidates", 1), 0) is None  # no round after the budget ran out
    larger = load_config(TINY, [*ADAPTIVE, "scoring.max_judge_requests=1000"])
    run_shard0(larger, store)
    record = store.shard_entry("scores", 0)
    assert record.get("unrated_budget", 0) == 0 and all(r["mas"] is not None for r in store.read_shard("scores", 0).to_pylist())
    from m3po_core.scoring.budget import run_spend

    spent = run_spend(store)["requests"]
    assert spent == store.shard_entry("candidates", 0)["rows"]  # each candidate rated once: the 20 not again
