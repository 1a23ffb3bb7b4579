"""The explained world (data.world.explain): yes/no answers that go on to say what the image shows, as
LLaVA's do, written with the world's bias in the instruction data and graded by degree by the judge;
and the cache-key rule that lets such an option arrive without moving any existing key."""
import copy
import dataclasses

from m3po_core.config import load_config
from m3po_core.config.invalidation import FIELD_STAGES, INTRODUCED_AT
from m3po_core.data import synthetic
from m3po_core.data.synthetic_prompts import make_prompts
from m3po_core.scoring.judge import JudgeItem, ReferenceJudge, named_objects
from m3po_core.stages.runner import stage_config, stage_key

BIAS = synthetic.WorldBias(0.7, 0.8)


def test_explaining_changes_only_the_yes_no_references_and_keeps_their_first_sentence():
    scenes = synthetic.make_scenes(0, "train", 120, BIAS)
    plain = make_prompts(scenes, 0, per_scene=4, bias=BIAS, open_per_scene=1)
    explained = make_prompts(scenes, 0, per_scene=4, bias=BIAS, open_per_scene=1, explain=True)
    assert [{**p, "reference": None} for p in plain] == [{**p, "reference": None} for p in explained]
    vocab = set(synthetic.vocabulary(open_kinds=True, explain=True))
    for p, e in zip(plain, explained):
        if p["kind"] in synthetic.YES_NO_KINDS:
            assert e["reference"].startswith(p["reference"] + " the image shows ")
            assert synthetic.explains(p["kind"], e["reference"]) and not synthetic.explains(p["kind"], p["reference"])
        else:
            assert e["reference"] == p["reference"]
        assert set(e["reference"].split(" ")) <= vocab, e["reference"]
    # a world without explanations keeps its vocabulary, so its carried models keep their tokenizer
    assert set(synthetic.vocabulary(open_kinds=True, explain=True)) - set(synthetic.vocabulary(open_kinds=True)) == {"shows"}


def test_explanations_carry_the_bias_and_never_contradict_their_answer():
    scenes = synthetic.make_scenes(0, "train", 600, BIAS)
    for bias, biased in ((BIAS, True), (synthetic.NO_BIAS, False)):
        invented = eligible = 0
        for p in make_prompts(scenes, 0, per_scene=4, bias=bias, explain=True):
            if p["kind"] not in synthetic.YES_NO_KINDS:
                continue
            scene = synthetic.Scene.from_json(p["scene"])
            head, tail = p["reference"].split(" . ", 1)
            named = set(named_objects(tail))
            assert scene.pairs() <= named
            extra = named - scene.pairs()
            assert extra <= set(scene.absent_companions())
            if p["kind"] == "exist":
                asked = synthetic.parse_instruction(p["instruction"])[1]
                pair = (asked["colour"], asked["shape"])
                assert (pair in named) == head.startswith("yes"), p  # the explanation agrees with the answer
            if scene.absent_companions() and not (p["kind"] == "exist" and head.startswith("yes")):
                eligible += 1
                invented += bool(extra)
        share = invented / eligible
        assert (0.6 < share < 0.9) if biased else share == 0, share


def _rate(prompt, responses):
    return ReferenceJudge().score([JudgeItem("p", prompt["instruction"], r, meta={
        "scene": prompt["scene"], "reference": prompt["reference"]}) for r in responses])


def test_the_judge_grades_an_explained_answer_by_its_answer_first_then_its_explanation():
    scene = synthetic.Scene("s", (synthetic.SceneObject("circle", "red", "top left"),
                                  synthetic.SceneObject("square", "blue", "bottom right")))
    params = {"colour": "green", "shape": "circle"}
    prompt = {"instruction": synthetic.instruction_text("exist", params), "scene": scene.to_json(),
              "reference": synthetic.explained_answer(scene, "exist", params)}
    truth = prompt["reference"]
    scores = _rate(prompt, [
        truth,
        "no , there is no green circle . the image shows a red circle at the top left .",  # half the scene
        "no , there is no green circle . the image shows a red circle at the top left and a blue square "
        "at the top right .",                                                                # one misplaced
        "no , there is no green circle . the image shows a red circle at the top left , a blue square at "
        "the bottom right and a yellow square at the top right .",                          # one invented
        "no , there is no green circle .",                                                   # unexplained
        "yes , there is a green circle . the image shows a red circle at the top left and a blue square at "
        "the bottom right .",                                                                 # wrong answer
    ])
    accuracy = [s.accuracy for s in scores]
    assert accuracy[0] == 1.0 and scores[0].overall == 1.0
    assert 1.0 > accuracy[2] > accuracy[1] > accuracy[4]
    assert 1.0 > accuracy[3] > accuracy[4]
    assert accuracy[4] > accuracy[5]  # a right answer badly explained beats a wrong one well explained
    assert len({round(a, 6) for a in accuracy}) == 6  # graded: every candidate rated apart
    # the same responses under an unexplained reference: graded as before, the second sentence unread
    plain = {**prompt, "reference": synthetic.answer_text(scene, "exist", params)}
    assert [s.accuracy for s in _rate(plain, [truth, "no , there is no green circle ."])] == [1.0, 1.0]


def test_a_new_option_at_its_introduced_value_moves_no_cache_key():
    cfg = load_config(None, ["data.world.explain=false"])
    assert set(INTRODUCED_AT) <= set(FIELD_STAGES)
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg.data.world))}
    assert INTRODUCED_AT["data.world.explain"] is defaults["explain"] is False
    for stage in FIELD_STAGES["data.world.explain"]:
        assert "data.world.explain" not in stage_config(cfg, stage)
        changed = copy.deepcopy(cfg)
        changed.data.world.explain = True
        assert stage_config(changed, stage)["data.world.explain"] is True
        assert stage_key(changed, stage) != stage_key(cfg, stage)


def test_ipa_s_reference_verifier_and_ift_rules_read_explained_answers():
    from m3po_core import ipa
    from m3po_core.evaluation import ift

    scenes = synthetic.make_scenes(0, "train", 40, BIAS)
    verifier = ipa.ReferenceVerifier()
    for p in make_prompts(scenes, 0, per_scene=4, explain=True):
        if p["kind"] not in synthetic.YES_NO_KINDS:
            continue
        scene = synthetic.Scene.from_json(p["scene"])
        head = p["reference"].split(" . ", 1)[0] + " ."
        absent = next(pair for pair in synthetic.ALL_PAIRS if pair not in scene.pairs())
        invented = p["reference"][:-2] + f", and a {absent[0]} {absent[1]} ."
        true, short, wrong = verifier.verify([ipa.Item(p["prompt_id"], None, p["instruction"], r, p["reference"],
                                                       p["scene"]) for r in (p["reference"], head, invented)])
        assert true.entailment and true.completeness and true.no_contradiction and true.compliance, p
        assert short.entailment and not short.completeness, p
        assert wrong.entailment and not wrong.no_contradiction, p
        rules = [c for c in ift.synthetic_constraints(*synthetic.parse_instruction(p["instruction"]), explained=True)
                 if c["type"] != "judge"]
        assert all(ift.check(p["reference"], c) for c in rules)
        assert any(c == {"type": "max_words", "n": 12} for c in ift.synthetic_constraints(
            *synthetic.parse_instruction(p["instruction"])))
