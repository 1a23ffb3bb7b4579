"""IPA: verification, revision, pairing and the progressive rounds, each on behaviour."""
import json
from pathlib import Path

import pytest
from PIL import Image

from m3po_core import ipa
from m3po_core.data import synthetic as world
from m3po_core.data import synthetic_prompts
from openai_server import FakeOpenAIServer, Reply, request_text

TINY = Path(__file__).parent / "tiny.yaml"


def _scene_prompt(kind: str):
    scenes = world.make_scenes(3, "eval", 30)
    for scene in scenes:
        for p in synthetic_prompts.make_prompts([scene], 3, per_scene=len(world.KINDS)):
            if p["kind"] == kind and (kind != "describe" or len(scene.objects) >= 2):
                return p
    raise AssertionError(kind)


def _item(p, response):
    return ipa.Item(p["prompt_id"], Image.new("RGB", (8, 8)), p["instruction"], response, p["reference"], p["scene"])


def test_reference_verifier_accepts_the_reference_and_fails_each_condition_alone():
    v = ipa.ReferenceVerifier()
    exist = _scene_prompt("exist")
    [ok] = v.verify([_item(exist, exist["reference"])])
    assert ok.verified and ok.failed() == []
    # "yes ." / "no ." alone: right, but the reference explains itself: completeness fails only
    bare = exist["reference"].split(" ")[0] + " ."
    [short] = v.verify([_item(exist, bare)])
    assert short.failed() == ["completeness"] and not short.verified
    describe = _scene_prompt("describe")
    scene = world.Scene.from_json(describe["scene"])
    first = scene.objects[0]
    missing = f"a {first.colour} {first.shape} at the {first.position} ."
    [partial] = v.verify([_item(describe, missing)])
    assert not partial.entailment and not partial.completeness and partial.no_contradiction and partial.compliance
    absent = next((c, s) for c, s in world.ALL_PAIRS if (c, s) not in scene.pairs())
    [invented] = v.verify([_item(describe, describe["reference"].rstrip(" .") + f" and a {absent[0]} {absent[1]} at the "
                                                                     f"{first.position} .")])
    assert not invented.no_contradiction and not invented.verified


def test_parse_verdict_is_tolerant_but_never_invents_a_condition():
    text = 'Sure.\n```json\n{"Logical Entailment": "yes", "detail_completeness": true, ' \
           '"No-Contradiction": "true", "instruction compliance": false}\n```'
    assert ipa.parse_verdict(text) == ipa.Verdict(True, True, True, False)
    assert ipa.parse_verdict('{"entailment": true, "completeness": true, "no_contradiction": true}') is None
    assert ipa.parse_verdict("all four hold") is None


def _verifier_server(reply_for):
    def respond(body):
        return [Reply(content=reply_for(request_text(body)))]
    return FakeOpenAIServer(respond).start()


def test_openai_verifier_one_failed_condition_means_v0_and_unreadable_means_no_verdict(monkeypatch):
    monkeypatch.setenv("VERIFIER_KEY", "sk-v")
    good = json.dumps({"entailment": True, "completeness": True, "no_contradiction": True, "compliance": True})
    one_off = json.dumps({"entailment": True, "completeness": True, "no_contradiction": False, "compliance": True})
    server = _verifier_server(lambda text: good if "ANSWER-A" in text else one_off if "ANSWER-B" in text
                              else "I think it is mostly fine.")
    try:
        from m3po_core.openai_http import RetryPolicy

        v = ipa.OpenAIVerifier("verifier-model", server.base_url, "VERIFIER_KEY")
        v.retry = RetryPolicy(max_retries=2, backoff_base=0.01, backoff_max=0.02)
        p = {"prompt_id": "p", "instruction": "What is shown?", "reference": "A cat.", "scene": None}
        a, b, c = v.verify([_item(p, "ANSWER-A"), _item(p, "ANSWER-B"), _item(p, "ANSWER-C")])
        assert a.verified and not b.verified and b.failed() == ["no_contradiction"] and c is None
        assert len(server.requests_containing("ANSWER-C")) == 3          # retried, then given up
        assert all("Reference answer: A cat." in r.text for r in server.requests)
        assert all(r.headers["authorization"] == "Bearer sk-v" for r in server.requests)
    finally:
        server.stop()


def test_sampler_reviser_shows_the_reference_to_the_feedback_step_only(monkeypatch):
    from m3po_core.sampling.openai_backend import OpenAICompatibleSampler

    server = FakeOpenAIServer(lambda body: [Reply(content="FEEDBACK: too short" if "Point out" in request_text(body)
                                                  else "A grey cat on a red sofa.")]).start()
    try:
        reviser = ipa.SamplerReviser(OpenAICompatibleSampler("reviser", server.base_url), max_new_tokens=32)
        p = {"prompt_id": "p", "instruction": "What is shown?", "reference": "REF-ANSWER", "scene": None}
        items = [_item(p, "A cat.")]
        for with_reference in (False, True):
            fb = reviser.feedback(items, with_reference)
            assert fb == ["FEEDBACK: too short"]
            assert reviser.refine(items, fb, with_reference) == ["A grey cat on a red sofa."]
        feedback_reqs = server.requests_containing("Point out")
        refine_reqs = server.requests_containing("Write an improved answer")
        assert ["REF-ANSWER" in r.text for r in feedback_reqs] == [False, True]
        assert not any("REF-ANSWER" in r.text for r in refine_reqs)
        assert all("Feedback: FEEDBACK: too short" in r.text for r in refine_reqs)
    finally:
        server.stop()


def test_round_pairs_pair_verified_against_failed_and_carry_the_unresolved():
    def r(pid, idx, verified, origin="normal", feedback=""):
        return {"prompt_id": pid, "resp_idx": idx, "verified": verified, "origin": origin, "feedback": feedback,
                "parent_idx": -1, "text": f"{pid}{idx}"}
    responses = [r("a", 0, False), r("a", 1, True), r("a", 2, None),                         # a pair
                 r("b", 0, False), r("b", 1, None),                                          # unresolved
                 r("c", 0, True), r("c", 1, True),                                           # nothing to prefer
                 r("d", 0, False, "revised", "fb-bad"), r("d", 1, True, "revised", "fb-good")]
    pairs, fb_pairs, stats = ipa.round_pairs(responses, seed=0, round_no=1)
    assert [(p["prompt_id"], p["chosen"]["resp_idx"], p["rejected"]["resp_idx"]) for p in pairs] == \
        [("a", 1, 0), ("d", 1, 0)]
    assert [(p["chosen"]["feedback"], p["rejected"]["feedback"]) for p in fb_pairs] == [("fb-good", "fb-bad")]
    assert stats["unresolved"] == ["b"] and stats["all_verified"] == 1 and stats["pairs"] == 2


@pytest.mark.slow
def test_ipa_rounds_end_to_end_on_the_synthetic_world(tmp_path):
    from m3po.flows.ipa import ipa_rounds
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    cfg = load_config(TINY)
    root = str(tmp_path)
    out = ipa_rounds(cfg.to_dict(), root, "ipa1")
    store = RunStore(root, "ipa1")
    summaries = [store.read_json(f"ipa/round-{r}/summary.json") for r in (1, 2, 3)]
    # each round's samples are exactly the previous round's unresolved ones
    for r in (2, 3):
        n = store.read_json(f"ipa/round-{r}/prompts/_stage.json")["n_shards"]
        ids = sorted(p for i in range(n) for p in
                     store.read_table(RunStore.shard_rel(f"ipa/round-{r}/prompts", i)).column("prompt_id").to_pylist())
        assert ids == sorted(summaries[r - 2]["unresolved"]) and ids
    responses = {r: store.read_stage(f"ipa/round-{r}/responses").to_pylist() for r in (1, 2, 3)}
    by_key = {(x["prompt_id"], r, x["resp_idx"]): x for r, rows in responses.items() for x in rows}
    pairs = store.read_table("pairs.parquet").to_pylist()
    assert len(pairs) == sum(s["pairs"] for s in summaries) == out["pairs"]["pairs"] > 0
    for p in pairs:
        r = int(p["strategy"].rsplit("-", 1)[1])
        assert by_key[(p["prompt_id"], r, p["chosen_idx"])]["verified"] is True
        assert by_key[(p["prompt_id"], r, p["rejected_idx"])]["verified"] is False
        assert p["chosen_token_ids"] and p["rejected_token_ids"]
    # the run graph (as the Prefect UI draws it) has the rounds in order: a round's prompts wait for
    # the previous round's pairs, its shards for its prompts and generator
    from prefect.client.orchestration import get_client

    from prefect_graph import flow_run_id, graph_edges

    with get_client(sync_client=True) as client:
        edges = graph_edges(client, flow_run_id(client, "ipa-rounds-ipa1"))
    assert {("ipa-collect-round-1", "ipa-prompts-round-2"), ("ipa-collect-round-2", "ipa-prompts-round-3"),
            ("ipa-prompts-round-1", "ipa-round-1-shard"), ("ipa-generator-round-2", "ipa-round-2-shard"),
            ("ipa-collect-round-3", "ipa-pairs")} <= edges, edges
    n, k = cfg.ipa.n_normal, cfg.ipa.n_contrastive
    for x in responses[1]:
        if x["resp_idx"] < n:
            assert x["origin"] == "normal" and x["perturbation"] == ""
        elif x["resp_idx"] < n + k:
            assert x["origin"] == "contrastive" and x["perturbation"] in ("noise", "blur", "scale")
        else:
            assert x["origin"] == "revised" and x["parent_idx"] == x["resp_idx"] - n - k and x["feedback"]
    # reference-guided feedback from round 3 only
    assert not any("(reference:" in x["feedback"] for r in (1, 2) for x in responses[r])
    assert all("(reference:" in x["feedback"] for x in responses[3] if x["origin"] == "revised")
    # self-evolution: rounds 2 and 3 sample from a generator trained on the earlier pairs
    assert store.dir_complete("ipa/round-2/generator")
    assert store.read_json("ipa/round-2/generator.json")["pairs"] == summaries[0]["pairs"]

    # re-run: everything cached; a lost shard is the only one computed again
    import time

    stage = "ipa/round-1/responses"
    before = {e["shard"]: e["finished_at"] for e in store.manifest(stage)}
    Path(store.path(RunStore.shard_rel(stage, 1))).unlink()
    store.mark_shard(stage, 1, "running", store.shard_entry(stage, 1)["key"])
    time.sleep(0.01)
    again = ipa_rounds(cfg.to_dict(), root, "ipa1")
    after = {e["shard"]: e["finished_at"] for e in store.manifest(stage)}
    assert after[1] > before[1] and all(after[s] == before[s] for s in before if s != 1)
    assert again["computed"] == 1 and again["pairs"]["pairs"] == out["pairs"]["pairs"]


def test_ipa_on_instruction_data_needs_model_reviser_and_verifier():
    from m3po_core.config import ConfigError, check_ipa, load_config

    real = ["data.source=llava_instruct", "data.path=x.json", "data.image_root=/img", "scoring.judge=openai:j",
            "evaluation.benchmarks=[]"]
    cfg = load_config(TINY, real)   # an M3PO run on real data ignores the ipa section
    with pytest.raises(ConfigError, match="'ipa.reviser': the reference reviser needs the synthetic world"):
        check_ipa(cfg)
    check_ipa(load_config(TINY, real + ["ipa.reviser=policy", "ipa.verifier=openai:v"]))
    with pytest.raises(ConfigError, match="'ipa.verifier'"):
        load_config(TINY, ["ipa.verifier=policy"])   # only a reviser can be the policy


def test_openai_verifier_stops_on_a_wrong_key_instead_of_leaving_everything_unverified(monkeypatch):
    from openai_server import Fault

    monkeypatch.setenv("VERIFIER_KEY", "sk-SECRET-v")
    server = _verifier_server(lambda text: "{}")
    server.fail_when("Answer to verify", Fault(kind="status", status=401))
    try:
        v = ipa.OpenAIVerifier("verifier-model", server.base_url, "VERIFIER_KEY")
        p = {"prompt_id": "p", "instruction": "What is shown?", "reference": "A cat.", "scene": None}
        with pytest.raises(RuntimeError, match="verifier verifier-model") as info:
            v.verify([_item(p, "A cat.")])
        assert "sk-SECRET-v" not in str(info.value) and len(server.requests) == 1   # not retried
        # unreadable replies only: nothing judged, so the shard fails (and is asked again on a re-run)
        server2 = _verifier_server(lambda text: "fine")
        try:
            from m3po_core.openai_http import RetryPolicy

            v2 = ipa.OpenAIVerifier("verifier-model", server2.base_url, "VERIFIER_KEY")
            v2.retry = RetryPolicy(max_retries=1, backoff_base=0.01, backoff_max=0.02)
            with pytest.raises(RuntimeError, match="no response of 2 could be judged"):
                v2.verify([_item(p, "A cat."), _item(p, "A dog.")])
        finally:
            server2.stop()
    finally:
        server.stop()


@pytest.mark.slow
def test_m3po_ipa_runs_end_to_end_through_the_cli(tmp_path):
    """`m3po ipa`: IPA's rounds, training, evaluation and its report card, through the same epilogue
    as M3PO's pipeline; `m3po status` then shows its rounds."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
    root = str(tmp_path / "runs")
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "ipa", "--config", str(TINY), "--root", root],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| POPE accuracy |" in out.stdout and "round(s)" in out.stdout
    run = tmp_path / "runs" / "tiny-ipa"
    assert json.loads((run / "method.json").read_text()) == {"method": "ipa"}
    assert (run / "report.md").read_text().startswith("# IPA report card: run `tiny-ipa`")
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"base", "trained", "intervals"} <= set(metrics) and "m3po" not in metrics
    assert {"accuracy", "f1"} <= set(metrics["intervals"]["pope"])
    status = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "status", "tiny-ipa", "--root", root],
                            env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "ipa/round-1/responses" in status.stdout

    # `m3po view`: a pair's prompt shows every response of its rounds with the verifier's four
    # conditions, the feedback of the revised ones, and the pair's two marked in their round
    import re

    import pyarrow.parquet as pq
    from markupsafe import escape

    from m3po_core.store import RunStore
    from viewer_server import get, serving

    pair = min(pq.read_table(run / "pairs.parquet").to_pylist(), key=lambda p: p["prompt_id"])
    with serving(root, "tiny-ipa", env=env) as url:
        code, html = get(f"{url}/pool/{pair['prompt_id']}")
    assert code == 200, html
    r = int(pair["strategy"].rsplit("-", 1)[1])
    responses = [x for rr in range(1, r + 1) for x in RunStore(root, "tiny-ipa").read_stage(f"ipa/round-{rr}/responses").to_pylist()
                 if x["prompt_id"] == pair["prompt_id"]]
    assert html.count('<tr class="candidate') == len(responses) > 0
    assert re.search(rf'<tr class="candidate chosen" data-round="{r}">\s*<td class="num">{r}</td><td class="num">{pair["chosen_idx"]}</td>', html)
    assert re.search(rf'<tr class="candidate rejected" data-round="{r}">\s*<td class="num">{r}</td><td class="num">{pair["rejected_idx"]}</td>', html)
    revised = next(x for x in responses if x["origin"] == "revised")
    assert str(escape(revised["feedback"])) in html


def test_the_reference_verifier_and_ift_rules_read_the_open_kinds():
    """The graded world's open questions (synthetic.OPEN_KINDS): a true answer passes all four
    conditions and its IFT rules; one that invents an absent companion is caught as a contradiction."""
    from m3po_core import ipa
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts
    from m3po_core.evaluation import ift
    from m3po_core.scoring.judge import named_objects

    scenes = world.make_scenes(0, "train", 60, world.WorldBias(0.7, 0.8))
    verifier, invented = ipa.ReferenceVerifier(), 0
    for p in synthetic_prompts.make_prompts(scenes, 0, per_scene=0, open_per_scene=3):
        scene = world.Scene.from_json(p["scene"])
        biased = synthetic_prompts.open_reference(scene, p["kind"], world.seeded_rng(1, p["prompt_id"]), world.WorldBias(0.7, 1.0))
        true, other = verifier.verify([ipa.Item(p["prompt_id"], None, p["instruction"], r, p["reference"], p["scene"])
                                       for r in (p["reference"], biased)])
        assert true.entailment and true.completeness and true.no_contradiction and true.compliance, p
        assert all(ift.check(p["reference"], c) for c in ift.synthetic_constraints(p["kind"], {}) if c["type"] != "judge")
        if set(named_objects(biased)) != scene.pairs():  # the companion was added
            invented += 1
            assert not other.no_contradiction, (p, biased)
    assert invented > 10
