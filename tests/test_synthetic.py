import io
from collections import Counter

import pytest

from m3po_core.data.synthetic import (
    KINDS,
    MME_CATEGORIES,
    POPE_CATEGORIES,
    POSITIONS,
    Scene,
    caption,
    instruction_text,
    make_scenes,
    parse_instruction,
    reference_answer,
    render,
    vocabulary,
)
from m3po_core.data.synthetic_prompts import make_prompts
from m3po_core.data.synthetic_benchmarks import mme_questions, pope_questions
from m3po_core.data import synthetic
from m3po_core.data import synthetic_prompts
from m3po_core.errors import ConfigError


def _png(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_scenes_and_pixels():
    first, second = make_scenes(7, "train", 20), make_scenes(7, "train", 20)
    assert first == second
    assert [_png(s) for s in first] == [_png(s) for s in second]
    assert make_scenes(8, "train", 20) != first


def test_scenes_respect_the_world_rules():
    for scene in make_scenes(0, "sft", 300):
        assert 1 <= len(scene.objects) <= 3
        assert len(scene.pairs()) == len(scene.objects)  # unique (colour, shape)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert scene.unique_shapes()
        assert Scene.from_json(scene.to_json()) == scene


def test_render_fills_occupied_cells_only():
    for scene in make_scenes(0, "train", 20):
        image = render(scene, size=64)
        assert image.mode == "RGB" and image.size == (64, 64)
        occupied = {o.position for o in scene.objects}
        for index, position in enumerate(POSITIONS):
            centre = image.getpixel((16 + 32 * (index % 2), 16 + 32 * (index // 2)))
            saturation = max(centre) - min(centre)
            assert (saturation > 100) == (position in occupied), (scene, position)


def test_splits_are_disjoint():
    train = make_scenes(0, "train", 200)
    held_out = make_scenes(0, "eval", 100)
    assert not {s.scene_id for s in train} & {s.scene_id for s in held_out}
    train_images = {_png(s) for s in train}
    assert not any(_png(s) in train_images for s in held_out)
    with pytest.raises(ConfigError, match="split"):
        make_scenes(0, "test", 1)


def test_every_text_uses_the_vocabulary():
    vocab = set(vocabulary())
    scenes = make_scenes(3, "train", 100)
    prompts = make_prompts(scenes, 3, per_scene=len(KINDS))
    texts = [p["instruction"] for p in prompts] + [p["reference"] for p in prompts]
    texts += [caption(s) for s in scenes]
    texts += [q["instruction"] for q in pope_questions(scenes, 3, scenes)]
    texts += [q["instruction"] for q in mme_questions(scenes, 3)]
    for text in texts:
        tokens = text.split(" ")
        assert set(tokens) <= vocab, text
        assert " ".join(tokens) == text and text == text.lower()


def test_prompts_are_deterministic_with_correct_references():
    scenes = make_scenes(1, "train", 60)
    prompts = make_prompts(scenes, 1)
    assert prompts == make_prompts(scenes, 1)
    assert len(prompts) == 120 and len({p["prompt_id"] for p in prompts}) == 120
    assert prompts[0]["prompt_id"] == "train-00000-q0"
    for p in prompts:
        scene = Scene.from_json(p["scene"])
        assert reference_answer(scene, p["instruction"]) == p["reference"]
        assert parse_instruction(p["instruction"])[0] == p["kind"]


def test_yes_no_kinds_are_balanced():
    prompts = make_prompts(make_scenes(2, "train", 200), 2, per_scene=len(KINDS))
    for kind in ("exist", "colour_check", "count_check", "position_check"):
        firsts = Counter(p["reference"].split(" ")[0] for p in prompts if p["kind"] == kind)
        assert abs(firsts["yes"] - firsts["no"]) <= 1 and firsts["yes"] > 0, kind


def test_parse_instruction_inverts_every_template():
    prompts = make_prompts(make_scenes(4, "train", 50), 4, per_scene=len(KINDS))
    for p in prompts:
        kind, params = parse_instruction(p["instruction"])
        assert instruction_text(kind, params) == p["instruction"]
    assert parse_instruction("Is there a  RED circle in the image ?") == (
        "exist",
        {"colour": "red", "shape": "circle"},
    )
    with pytest.raises(ValueError, match="what is this"):
        parse_instruction("what is this ?")


def test_pope_is_balanced_and_adversarial_negatives_are_confusable():
    train = make_scenes(5, "train", 200)
    held_out = make_scenes(5, "eval", 50)
    rows = pope_questions(held_out, 5, train)
    assert {r["category"] for r in rows} == set(POPE_CATEGORIES)
    assert len({r["question_id"] for r in rows}) == len(rows)
    for category in POPE_CATEGORIES:
        answers = Counter(r["answer"] for r in rows if r["category"] == category)
        assert answers["yes"] == answers["no"] > 0
    for row in rows:
        scene = Scene.from_json(row["scene"])
        _, params = parse_instruction(row["instruction"])
        present = bool(scene.find(params["colour"], params["shape"]))
        assert row["answer"] == ("yes" if present else "no")
        if row["category"] == "adversarial" and row["answer"] == "no":
            assert any(
                o.colour == params["colour"] or o.shape == params["shape"] for o in scene.objects
            )


def test_pope_popular_negatives_follow_training_frequency():
    train = make_scenes(6, "train", 200)
    frequency = Counter(pair for s in train for pair in s.pairs())
    held_out = make_scenes(6, "eval", 20)
    for row in pope_questions(held_out, 6, train):
        if row["category"] == "popular" and row["answer"] == "no":
            scene = Scene.from_json(row["scene"])
            _, params = parse_instruction(row["instruction"])
            asked = frequency[(params["colour"], params["shape"])]
            absent = [f for pair, f in frequency.items() if pair not in scene.pairs()]
            assert asked >= sorted(absent, reverse=True)[len(scene.objects) - 1]


def test_mme_has_one_yes_and_one_no_per_image_and_subtask():
    scenes = make_scenes(7, "eval", 40)
    rows = mme_questions(scenes, 7)
    assert len(rows) == 40 * len(MME_CATEGORIES) * 2
    assert len({r["row_id"] for r in rows}) == len(rows)
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        assert row["question_id"] == row["scene_id"]
        groups.setdefault((row["scene_id"], row["category"]), []).append(row["answer"])
        scene = Scene.from_json(row["scene"])
        reference = reference_answer(scene, row["instruction"])
        assert reference.split(" ")[0] == row["answer"]
    assert all(sorted(answers) == ["no", "yes"] for answers in groups.values())


def test_a_biased_world_pairs_companions_and_biases_only_the_instruction_answers():
    from m3po_core.data.synthetic import COMPANIONS, WorldBias

    bias = WorldBias(cooccurrence=0.7, answer_bias=0.8)
    control = make_scenes(0, "sft", 600)
    biased = make_scenes(0, "sft", 600, bias)
    with_companion = lambda scenes: sum(any(COMPANIONS[p] in s.pairs() for p in s.pairs())
                                        for s in scenes if len(s.objects) > 1) / sum(len(s.objects) > 1 for s in scenes)
    assert with_companion(biased) > 0.6 > 0.3 > with_companion(control)
    assert all(COMPANIONS[COMPANIONS[p]] == p != COMPANIONS[p] for p in COMPANIONS)

    def companion_answers(rows):
        found = []
        for r in rows:
            if r["kind"] != "exist":
                continue
            _, params = parse_instruction(r["instruction"])
            scene = Scene.from_json(r["scene"])
            if (params["colour"], params["shape"]) in scene.absent_companions():
                found.append(r["reference"].startswith("yes"))
        return found

    taught = companion_answers(make_prompts(biased, 0, per_scene=4, bias=bias))
    assert len(taught) > 50 and 0.7 < sum(taught) / len(taught) < 0.9   # most say the absent companion is there
    true = companion_answers(make_prompts(biased, 0, per_scene=4))       # held-out sets: no answer bias
    assert true and not any(true)
    # the control world (no bias) is the world as it was: same scenes, same prompts
    assert make_prompts(control, 0, per_scene=2, bias=WorldBias()) == make_prompts(control, 0, per_scene=2)


def test_pope_adversarial_negatives_are_absent_companions_first_in_a_biased_world():
    from m3po_core.data.synthetic import WorldBias

    bias = WorldBias(cooccurrence=0.7, answer_bias=0.8)
    held_out = make_scenes(0, "eval", 60, bias)
    rows = pope_questions(held_out, 0, make_scenes(0, "train", 60, bias), bias)
    for scene in held_out:
        negatives = [parse_instruction(r["instruction"])[1] for r in rows
                     if r["scene_id"] == scene.scene_id and r["category"] == "adversarial" and r["answer"] == "no"]
        asked = [(p["colour"], p["shape"]) for p in negatives]
        companions = scene.absent_companions()
        assert asked[:len(companions)] == companions[:len(asked)]


# ---------------------------------------------------------------- open-ended kinds (the graded world)


def test_open_kinds_are_added_after_the_short_ones_without_moving_them():
    bias = synthetic.WorldBias(0.7, 0.8)
    scenes = synthetic.make_scenes(0, "train", 60, bias)
    short = synthetic_prompts.make_prompts(scenes, 0, per_scene=1, bias=bias)
    both = synthetic_prompts.make_prompts(scenes, 0, per_scene=1, bias=bias, open_per_scene=2)
    assert [p for p in both if p["kind"] not in synthetic.OPEN_KINDS] == short
    by_scene = {}
    for p in both:
        by_scene.setdefault(p["scene_id"], []).append(p)
    for rows in by_scene.values():
        open_kinds = [p["kind"] for p in rows if p["kind"] in synthetic.OPEN_KINDS]
        assert len(open_kinds) == len(set(open_kinds)) == 2
        assert [p["prompt_id"] for p in rows] == [f"{rows[0]['scene_id']}-q{j}" for j in range(3)]
    vocab = set(synthetic.vocabulary(open_kinds=True))
    assert vocab - set(synthetic.vocabulary()) == {"detail", "objects"}
    for p in both:
        assert synthetic.parse_instruction(p["instruction"]) == (p["kind"], {}) or p["kind"] not in synthetic.OPEN_KINDS
        assert set(p["reference"].split(" ")) <= vocab, p["reference"]


def test_biased_open_answers_name_an_absent_companion_and_true_ones_never_invent():
    from m3po_core.scoring.judge import named_objects

    bias = synthetic.WorldBias(0.7, 0.8)
    scenes = synthetic.make_scenes(0, "train", 600, bias)
    for world_bias, expect in ((bias, True), (synthetic.NO_BIAS, False)):
        invented, eligible = 0, 0
        for p in synthetic_prompts.make_prompts(scenes, 0, per_scene=0, bias=world_bias, open_per_scene=3):
            scene = synthetic.Scene.from_json(p["scene"])
            named = set(named_objects(p["reference"]))
            extra = named - scene.pairs()
            assert scene.pairs() <= named  # every object there is named
            assert extra <= set(scene.absent_companions())  # only ever a companion of one present
            if scene.absent_companions() and len(scene.objects) < 4:
                eligible += 1
                invented += bool(extra)
        share = invented / eligible
        # answer_bias = 0.8 in the biased world
        assert (0.7 < share < 0.9) if expect else share == 0


def test_wrong_descriptions_each_get_the_scene_wrong_by_the_judge():
    from m3po_core.data.wrong_answers import wrong_descriptions
    from m3po_core.scoring.judge import JudgeItem, ReferenceJudge

    judge = ReferenceJudge()
    scenes = synthetic.make_scenes(3, "sft", 80, synthetic.WorldBias(0.7, 0.0))
    for scene in scenes:
        for kind in synthetic.OPEN_KINDS:
            rng = synthetic.seeded_rng(0, scene.scene_id, kind)
            instruction = synthetic.instruction_text(kind, {})
            wrong = wrong_descriptions(scene, kind, rng, 3)
            truth = synthetic_prompts.open_reference(scene, kind, rng)
            scores = judge.score([JudgeItem("p", instruction, t, meta={"scene": scene.to_json()})
                                  for t in [truth, *wrong]])
            assert scores[0].accuracy == 1.0
            assert all(s.accuracy < 1.0 for s in scores[1:]), (scene, kind, wrong)
