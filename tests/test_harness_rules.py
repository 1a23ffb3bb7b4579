"""Each public harness's scoring rule, by hand-worked figures on replies the rules disagree on."""
import pytest

from m3po_core.evaluation import mme, pope
from m3po_core.evaluation.harness_rules import RULES, read_mme, read_pope

# reply: (default, lmms-eval POPE, lmms-eval MME, vlmevalkit, llava POPE, llava MME)
READINGS = {
    "yes": ("yes", "yes", "yes", "yes", "yes", "yes"),
    "Yes.": ("yes", "unknown", "yes", "yes", "yes", "yes"),
    "No, there is not.": ("no", "unknown", "no", "no", "no", "no"),
    "Not sure.": ("no", "unknown", "no", "unknown", "yes", "no"),
    "y": ("unknown", "unknown", "yes", "unknown", "yes", "unknown"),
    "Yes and no": ("no", "unknown", "yes", "unknown", "no", "yes"),
    "": ("unknown", "unknown", "unknown", "unknown", "yes", "unknown"),
    "yes/no": ("no", "unknown", "yes", "unknown", "yes", "yes"),
    " NO ": ("no", "no", "no", "no", "yes", "no"),
}


@pytest.mark.parametrize("reply", list(READINGS))
def test_each_rule_reads_a_reply_as_its_harness_does(reply):
    default, lmms_pope, lmms_mme, vlmevalkit, llava_pope, llava_mme = READINGS[reply]
    assert read_pope(reply, "default") == read_mme(reply, "default") == default
    assert read_pope(reply, "lmms-eval") == lmms_pope
    assert read_mme(reply, "lmms-eval") == lmms_mme
    assert read_pope(reply, "vlmevalkit") == read_mme(reply, "vlmevalkit") == vlmevalkit
    assert read_pope(reply, "llava") == llava_pope
    assert read_mme(reply, "llava") == llava_mme


def test_vlmevalkit_punctuation_follows_the_vqa_tool():
    # "/" not beside a space is a word break; beside one, or with a digit-comma-digit anywhere, it vanishes
    assert read_pope("yes/no", "vlmevalkit") == "unknown"
    assert read_pope("yes /no", "vlmevalkit") == "unknown"   # "yes no" either way: both words
    assert read_pope("Yes, 1,000 of them.", "vlmevalkit") == "yes"
    assert read_pope("no.", "vlmevalkit") == "no"


def test_an_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="'lmms'; one of .*lmms-eval"):
        pope.score([{"question_id": "1", "category": "random", "answer": "yes", "prediction": "yes"}], rule="lmms")


POPE = [  # (category, gold, reply)
    ("random", "yes", "Yes."),
    ("random", "yes", "Not sure."),
    ("random", "no", "No, there is not."),
    ("random", "no", "y"),
    ("adversarial", "yes", "no"),
    ("adversarial", "no", "Yes and no"),
    ("adversarial", "yes", ""),
    ("adversarial", "no", "yes"),
    ("adversarial", "yes", "yes"),
]
POPE_RECORDS = [{"question_id": str(i), "category": c, "answer": a.capitalize(), "prediction": p}
                for i, (c, a, p) in enumerate(POPE)]

# rule: accuracy, precision, recall, f1, yes_ratio, unknown (worked by hand from READINGS)
POPE_FIGURES = {
    "default": (4 / 9, 2 / 3, 2 / 5, 0.5, 3 / 9, 2),        # TP 2 FN 3 (2 no + 1 unknown) TN 2 FP 1
    "lmms-eval": (1 / 9, 1 / 2, 1 / 2, 0.5, 5 / 9, 6),      # TP 1, FN only the exact "no", FP 1; gold-yes share
    "vlmevalkit": (3 / 9, 2 / 3, 2 / 5, 0.5, 3 / 9, 4),     # TP 2 FN 3 TN 1 FP 1
    "llava": (6 / 9, 4 / 6, 4 / 5, 8 / 11, 6 / 9, 0),       # TP 4 FN 1 TN 2 FP 2: nothing is unknown
}


@pytest.mark.parametrize("rule", RULES)
def test_pope_figures_under_each_rule(rule):
    result = pope.score(POPE_RECORDS, rule=rule)
    accuracy, precision, recall, f1, yes_ratio, unknown = POPE_FIGURES[rule]
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["precision"] == pytest.approx(precision)
    assert result["recall"] == pytest.approx(recall)
    assert result["f1"] == pytest.approx(f1)
    assert result["yes_ratio"] == pytest.approx(yes_ratio)
    assert result["unknown"] == unknown and result["n"] == 9 and result["rule"] == rule
    assert result["yes_ratio_means"] == ("gold" if rule == "lmms-eval" else "predicted")
    # the same keys whatever the rule
    assert set(result) == set(pope.score(POPE_RECORDS))
    assert set(result["per_category"]) == {"random", "adversarial"}


def test_pope_splits_and_their_mean_under_llava():
    result = pope.score(POPE_RECORDS, rule="llava")
    random, adversarial = result["per_category"]["random"], result["per_category"]["adversarial"]
    # random: TP 2, TN 1, FP 1 ("y"); adversarial: FN 1, TN 1, TP 2, FP 1
    assert (random["accuracy"], random["precision"], random["recall"]) == pytest.approx((3 / 4, 2 / 3, 1.0))
    assert random["f1"] == pytest.approx(0.8)
    assert (adversarial["accuracy"], adversarial["f1"]) == pytest.approx((3 / 5, 2 / 3))
    assert result["mean_of_splits"]["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert result["mean_of_splits"]["accuracy"] == pytest.approx((0.75 + 0.6) / 2)


def test_vlmevalkit_counts_a_comma_joined_category_in_each_split():
    records = [{"question_id": "1", "category": "random,popular", "answer": "yes", "prediction": "Yes"},
               {"question_id": "2", "category": "random", "answer": "no", "prediction": "Yes"}]
    vlm = pope.score(records, rule="vlmevalkit")
    assert vlm["n"] == 3 and vlm["accuracy"] == pytest.approx(2 / 3)
    assert vlm["per_category"]["random"]["n"] == 2 and vlm["per_category"]["popular"]["n"] == 1
    own = pope.score(records)
    assert own["n"] == 2 and set(own["per_category"]) == {"random,popular", "random"}


MME = [  # (category, image, gold, reply)
    ("existence", "a.jpg", "Yes", "Yes."), ("existence", "a.jpg", "No", "No, there is not."),
    ("existence", "b.jpg", "Yes", "y"), ("existence", "b.jpg", "No", "Not sure."),
    ("existence", "c.jpg", "Yes", "Yes and no"), ("existence", "c.jpg", "No", "no"),
    ("commonsense_reasoning", "d.jpg", "Yes", "yes"), ("commonsense_reasoning", "d.jpg", "No", "yes"),
    ("other_task", "e.jpg", "Yes", "yes"), ("other_task", "e.jpg", "No", "no"),
]
MME_RECORDS = [{"question_id": img, "category": c, "answer": a, "prediction": p} for c, img, a, p in MME]

# rule: existence (acc, acc+), perception, cognition, unknown
MME_FIGURES = {
    "default": ((400 / 6, 100 / 3), 100.0, 50.0, 1),           # a 2/2, b 1/2 (y unknown), c 1/2
    "lmms-eval": ((100.0, 100.0), 200.0, 250.0, 0),            # every reply read right; other_task in cognition
    "vlmevalkit": ((50.0, 100 / 3), 250 / 3, 50.0, 3),         # b 0/2, c 1/2
    "llava": ((500 / 6, 200 / 3), 150.0, 50.0, 1),             # b 1/2 ("y" is other)
}


@pytest.mark.parametrize("rule", RULES)
def test_mme_figures_under_each_rule(rule):
    result = mme.score(MME_RECORDS, rule=rule)
    (acc, acc_plus), perception, cognition, unknown = MME_FIGURES[rule]
    existence = result["categories"]["existence"]
    assert (existence["acc"], existence["acc_plus"]) == pytest.approx((acc, acc_plus))
    # the image with one wrong answer of two: acc 50, acc+ 0, under every rule
    assert result["categories"]["commonsense_reasoning"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(perception)
    assert result["cognition"] == pytest.approx(cognition)
    assert result["score"] == pytest.approx(perception + cognition)
    assert result["unknown"] == unknown and result["rule"] == rule
    assert set(result) == set(mme.score(MME_RECORDS))


def test_every_rule_gives_each_rule_by_name():
    assert list(pope.every_rule(POPE_RECORDS)) == list(RULES)
    assert mme.every_rule(MME_RECORDS)["lmms-eval"]["score"] == pytest.approx(450.0)


def _write(path, rows):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_score_predictions_scores_a_file_under_every_rule(tmp_path, capsys, suffix):
    import json

    from m3po.flows.cli import main

    path = tmp_path / f"pope{suffix}"
    _write(path, POPE_RECORDS)
    assert main(["score-predictions", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "pope" and result["n"] == 9
    for rule, (accuracy, _, _, f1, yes_ratio, unknown) in POPE_FIGURES.items():
        m = result["rules"][rule]
        assert (m["accuracy"], m["f1"], m["yes_ratio"]) == pytest.approx((accuracy, f1, yes_ratio))
        assert m["unknown"] == unknown
    assert main(["score-predictions", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"POPE: 9 predictions from {path}"
    assert [line.split()[0] for line in table[2:]] == list(RULES)
    assert "0.7273" in table[-1] and "(gold)" in table[3]        # llava's F1; lmms-eval's gold yes-ratio


def test_score_predictions_tells_mme_by_its_subtasks(tmp_path, capsys):
    import json

    from m3po.flows.cli import main

    path = tmp_path / "mme.jsonl"
    _write(path, [r for r in MME_RECORDS if r["category"] != "other_task"])
    assert main(["score-predictions", str(path), "--json"]) == 0
    rules = json.loads(capsys.readouterr().out)["rules"]
    assert rules["lmms-eval"]["score"] == pytest.approx(250.0) and rules["default"]["score"] == pytest.approx(150.0)


@pytest.mark.parametrize("content, message", [
    ('{"question_id": "1", "category": "random", "answer": "yes"}\n', r"row 0: missing field\(s\) \['prediction'\]"),
    ('{"question_id": "1", "category": "random", "answer": "maybe", "prediction": "yes"}\n',
     r"record 0: field 'answer' is 'maybe'"),
    ('{"question_id": "1", "category": "lunch", "answer": "yes", "prediction": "yes"}\n',
     r"neither POPE's splits nor MME's subtasks"),
    ('not json\n', r"line 1: not JSON"),
])
def test_a_bad_predictions_file_is_refused_in_one_line_naming_it(tmp_path, capsys, content, message):
    import re

    from m3po.flows.cli import main

    path = tmp_path / "preds.jsonl"
    path.write_text(content)
    assert main(["score-predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and re.search(message, err)
