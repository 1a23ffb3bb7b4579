import pytest

from m3po_core.data.synthetic import KINDS, Scene, SceneObject, make_scenes
from m3po_core.data.synthetic_prompts import make_prompts
from m3po_core.errors import InputError
from m3po_core.scoring.judge import JudgeItem, ReferenceJudge

# a red circle at the top left and a blue square at the bottom right
SCENE = Scene(
    "test-00000",
    (SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")),
)


def _score(instruction: str, response: str, scene: Scene = SCENE):
    item = JudgeItem("p1", instruction, response, meta={"scene": scene.to_json()})
    return ReferenceJudge().score([item])[0]


def test_reference_answers_score_one():
    prompts = make_prompts(make_scenes(0, "train", 100), 0, per_scene=len(KINDS))
    items = [
        JudgeItem(p["prompt_id"], p["instruction"], p["reference"], meta={"scene": p["scene"]})
        for p in prompts
    ]
    scores = ReferenceJudge().score(items)
    assert {p["kind"] for p in prompts} == set(KINDS)
    assert all(s.overall == 1.0 for s in scores)


def test_wrong_yes_no_has_zero_accuracy():
    wrong_answers = {
        "is there a red circle in the image ?": "no , there is no red circle .",
        "is there a green circle in the image ?": "yes , there is a green circle .",
        "are there three shapes in the image ?": "yes , there are three shapes .",
        "is the red circle at the top right ?": "yes , the red circle is at the top right .",
    }
    for instruction, response in wrong_answers.items():
        assert _score(instruction, response).accuracy == 0, response


def test_self_contradicting_yes_no_is_wrong():
    score = _score("is there a red circle in the image ?", "yes , there is no red circle .")
    assert score.accuracy == 0


def test_correct_no_echoing_the_question_stays_relevant():
    score = _score("is there a green circle in the image ?", "no , there is no green circle .")
    assert score.overall == 1.0
    hallucinated = _score(
        "is there a green circle in the image ?", "yes , there is a green circle ."
    )
    assert hallucinated.relevance == 0


def test_right_no_with_a_wrong_fact_gets_half():
    score = _score("is the circle green ?", "no , the circle is yellow .")
    assert score.accuracy == 0.5


def test_wrong_colour():
    score = _score("what colour is the circle ?", "the circle is blue .")
    assert score.accuracy == 0 and score.relevance == 0
    hedged = _score("what colour is the circle ?", "the circle is red or blue .")
    assert hedged.accuracy == 0.5


def test_partially_right_description_gets_f1_in_between():
    one_right = _score("describe the image briefly .", "a red circle at the top left .")
    assert one_right.accuracy == pytest.approx(2 / 3)  # precision 1, recall 1/2
    one_wrong = _score(
        "describe the image briefly .",
        "a red circle at the top left and a green triangle at the top right .",
    )
    assert one_wrong.accuracy == pytest.approx(0.5)
    assert one_wrong.relevance == pytest.approx(0.5)


def test_garbage_has_low_adherence():
    looping = _score("describe the image briefly .", "circle circle circle circle circle circle")
    assert looping.adherence == 0 and looping.overall < 0.2
    rambling = _score(
        "is there a red circle in the image ?",
        "yes , there is a red circle at the top left at the top left at the top left and more",
    )
    assert rambling.adherence < 0.5
    assert _score("how many shapes are there ?", "").overall == 0


def test_missing_scene_names_the_prompt():
    item = JudgeItem("prompt-42", "how many shapes are there ?", "there are two shapes .", meta={})
    with pytest.raises(InputError, match="prompt-42"):
        ReferenceJudge().score([item])


def test_unknown_instruction_names_the_prompt():
    item = JudgeItem("prompt-7", "what is this ?", "a cat .", meta={"scene": SCENE.to_json()})
    with pytest.raises(InputError, match="prompt-7"):
        ReferenceJudge().score([item])


def test_open_answers_are_graded_by_degree():
    from m3po_core.data.synthetic import Scene, SceneObject

    scene = Scene("s", (SceneObject("circle", "blue", "top left"), SceneObject("triangle", "green", "top right"),
                        SceneObject("square", "yellow", "bottom left")))
    judge = ReferenceJudge()

    def rate(instruction, response):
        return judge.score([JudgeItem("p", instruction, response, meta={"scene": scene.to_json()})])[0]

    listing = "what objects are in the image ?"
    full = rate(listing, "a yellow square , a blue circle and a green triangle .")
    partial = rate(listing, "a blue circle and a green triangle .")
    invented = rate(listing, "a blue circle , a green triangle , a yellow square and a red circle .")
    assert full.accuracy == 1.0 and full.overall == 1.0
    assert 0 < partial.accuracy < 1 and partial.relevance == 1.0
    assert 0 < invented.accuracy < 1 and invented.relevance == 0.75
    detail = "describe the image in detail ."
    right = rate(detail, "there are three shapes , a blue circle at the top left , a green triangle at the top right "
                         "and a yellow square at the bottom left .")
    misplaced = rate(detail, "there are three shapes , a blue circle at the bottom right , a green triangle at the "
                             "top right and a yellow square at the bottom left .")
    miscounted = rate(detail, "there are two shapes , a blue circle at the top left , a green triangle at the top "
                              "right and a yellow square at the bottom left .")
    assert right.accuracy == 1.0 > miscounted.accuracy == pytest.approx(0.8)
    assert misplaced.accuracy == pytest.approx(0.8 * 2 * 2.5 / 6 + 0.2)  # one object at half credit
    # a wrong place costs less than a missing object, which costs less than an invented one
    assert full.overall == right.overall == 1 > misplaced.overall > partial.overall > invented.overall > 0.5
