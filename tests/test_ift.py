"""The instruction-following test: constraint checks, metrics worked out by hand, question sets."""
import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from m3po.flows.cli import main as cli
from m3po_core.data import synthetic as world
from m3po_core.data import synthetic_prompts
from m3po_core.errors import InputError
from m3po_core.evaluation import ift
from m3po_core.evaluation.public import load_public_benchmark
from m3po_core.scoring.judge import weighted_score


def test_metrics_on_hand_made_predictions():
    records = [
        {"question_id": "q1", "category": "describe", "prediction": "a red circle .",
         "constraints": json.dumps([{"type": "max_words", "n": 5}, {"type": "lowercase"}, ift.JUDGE_CONTENT])},
        {"question_id": "q2", "category": "yesno", "prediction": "Yes, there is one.",
         "constraints": [{"type": "yes_no_first"}, {"type": "max_words", "n": 3}]},
        {"question_id": "q3", "category": "describe", "prediction": "1. a cat\n2) a dog",
         "constraints": [{"type": "numbered_list", "n": 2}, ift.JUDGE_CONTENT]},
        {"question_id": "q4", "category": "format",
         "prediction": '```json\n{"objects": [], "summary": "an image"}\n```',
         "constraints": [{"type": "json_object", "keys": ["objects", "summary"]},
                         {"type": "exclude", "words": ["image"]}]},
    ]
    ratings = [weighted_score(0.9, 0.8, 0.9), None, None, None]  # q3's reply was not rated
    m = ift.score(records, ratings)
    assert m["n"] == 4 and m["unrated"] == 1
    # rated prompts q1 (all hold), q2 (4 words > 3), q4 ("image" used): 1 of 3
    assert m["prompt_accuracy"] == pytest.approx(1 / 3)
    # constraints decided: q1 3/3, q2 1/2, q3 1/1 (judge unrated, left out), q4 1/2 -> 6/8
    assert m["constraint_accuracy"] == pytest.approx(6 / 8)
    assert m["rule_prompt_accuracy"] == pytest.approx(2 / 4)  # q1, q3 pass their rules; q2, q4 fail
    assert m["by_type"] == {"exclude": 0.0, "json_object": 1.0, "judge_accuracy": 1.0, "lowercase": 1.0,
                            "max_words": 0.5, "numbered_list": 1.0, "yes_no_first": 1.0}
    assert m["by_category"] == {"describe": 1.0, "format": 0.0, "yesno": 0.0}


def test_judge_below_threshold_fails_and_unrated_is_never_counted():
    rec = {"question_id": "q", "category": "c", "prediction": "x",
           "constraints": [{"type": "judge", "aspect": "adherence", "min": 0.75}]}
    assert ift.score([rec], [weighted_score(1.0, 1.0, 0.5)])["prompt_accuracy"] == 0.0
    assert ift.score([rec], [weighted_score(1.0, 1.0, 0.75)])["prompt_accuracy"] == 1.0
    unrated = ift.score([rec], [None])
    assert unrated["unrated"] == 1 and unrated["by_type"] == {}


@pytest.mark.parametrize("constraint,reply,ok", [
    ({"type": "max_sentences", "n": 1}, "one thing. another thing.", False),
    ({"type": "max_sentences", "n": 1}, "the cup is on the table at 3.5 metres", True),
    ({"type": "max_sentences", "n": 1}, "   ", False),
    ({"type": "min_words", "n": 3}, "isn't it odd", True),
    ({"type": "include_any", "options": ["top left", "top right"]}, "it is at the Top  Left .", True),
    ({"type": "include_all", "words": ["left"]}, "the leftover cake", False),
    ({"type": "bullet_list", "n": 2}, "- a\n* b\nc", True),
    ({"type": "bullet_list", "n": 2}, "- a\n- b\n- c", False),
    ({"type": "json_object", "keys": ["a"]}, '{"a": 1} trailing', False),
    ({"type": "lowercase"}, "123", False),
    ({"type": "ends_with", "phrase": "that is all"}, "A dog. That is all.", True),
    ({"type": "ends_with", "phrase": "that is all"}, "A dog. That is all  ", True),
    ({"type": "ends_with", "phrase": "that is all"}, "That is all, I think.", False),
    ({"type": "yes_no_first"}, "No. There is none.", True),
    ({"type": "yes_no_first"}, "I think yes.", False),
])
def test_rule_checks(constraint, reply, ok):
    assert ift.check(reply, constraint) is ok


def test_bad_constraints_are_named():
    with pytest.raises(InputError, match="row 3.*unknown type 'max_chars'"):
        ift.parse_constraints('[{"type": "max_chars", "n": 3}]', "ift.parquet row 3")
    with pytest.raises(InputError, match="q7.*not valid JSON"):
        ift.parse_constraints("[{type: max_words}]", "q7")
    with pytest.raises(InputError, match=r"constraint 0 \(max_words\) lacks \['n'\]"):
        ift.parse_constraints([{"type": "max_words"}], "q")
    with pytest.raises(InputError, match="judge"):
        ift.parse_constraints([{"type": "judge", "aspect": "beauty", "min": 0.5}], "q")


def test_synthetic_reference_answers_meet_every_rule_constraint():
    """The world's IFT constraints are satisfiable: each reference answer meets all of its rules."""
    scenes = world.make_scenes(0, "eval", 40)
    prompts = synthetic_prompts.make_prompts(scenes, 0, per_scene=len(world.KINDS))
    assert {p["kind"] for p in prompts} == set(world.KINDS)
    for p in prompts:
        constraints = ift.synthetic_constraints(*world.parse_instruction(p["instruction"]))
        assert constraints[-1]["type"] == "judge"
        for c in constraints[:-1]:
            assert ift.check(p["reference"], c), (p["instruction"], p["reference"], c)
    # and a wrong-form answer fails: a yes/no question answered with a description
    yes_no = next(p for p in prompts if p["kind"] == "exist")
    rules = ift.synthetic_constraints(*world.parse_instruction(yes_no["instruction"]))[:-1]
    assert not all(ift.check("a red circle at the top left .", c) for c in rules)


def test_made_questions_have_compatible_constraints_and_are_deterministic():
    images = [f"/data/coco/{i:03d}.jpg" for i in range(60)]
    rows = ift.make_questions(images, seed=1, per_image=2)
    assert rows == ift.make_questions(images, seed=1, per_image=2)
    assert rows != ift.make_questions(images, seed=2, per_image=2)
    assert len(rows) == 120 and len({r["question_id"] for r in rows}) == 120
    by_constraint = {json.dumps(t[3], sort_keys=True): t for t in ift.TEMPLATES}
    used = set()
    for r in rows:
        constraints = ift.parse_constraints(r["constraints"], r["question_id"])
        rules = [by_constraint[json.dumps(c, sort_keys=True)] for c in constraints if c["type"] != "judge"]
        assert len(rules) == 2 and len({t[1] for t in rules}) == 2  # two groups
        assert frozenset(t[0] for t in rules) not in ift.CONFLICTS
        assert all(t[2] in r["question"] for t in rules) and r["question"].startswith(ift.TASKS[r["category"]])
        used |= {t[0] for t in rules}
    assert used == {t[0] for t in ift.TEMPLATES}  # every template gets drawn over 120 questions


def test_make_ift_cli_writes_a_file_the_loader_reads(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (8, 8), colour).save(imgs / f"{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "ift.parquet"
    assert cli(["make-ift", "--images", str(imgs), "--out", str(out), "--per-image", "2"]) == 0
    assert pq.read_table(out).num_rows == 6
    stored = {}
    records = load_public_benchmark(str(out), "ift", "\nsuffix not used", lambda n, d: stored.setdefault(n, n))
    assert len(records) == 6 and len(stored) == 3  # each image stored once
    assert all(not r["instruction"].endswith("suffix not used") for r in records)
    assert all(ift.parse_constraints(r["constraints"], "x") for r in records)
    assert cli(["make-ift", "--images", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_loader_names_the_row_with_bad_constraints(tmp_path):
    import pyarrow as pa

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    pq.write_table(pa.table({"question_id": ["a", "b"], "question": ["Describe.", "Describe."],
                             "image": [{"bytes": buf.getvalue(), "path": None}] * 2,
                             "constraints": ['[{"type": "lowercase"}]', '[{"type": "shout"}]']}), tmp_path / "f.parquet")
    with pytest.raises(InputError, match=r"f.parquet row 1 \(question_id 'b'\).*unknown type 'shout'"):
        load_public_benchmark(str(tmp_path / "f.parquet"), "ift", "", lambda n, d: n)
