"""POPE, MME and the yes/no parser on hand-made predictions with hand-worked scores."""

import pytest

from m3po_core.errors import InputError
from m3po_core.evaluation import mme, pope
from m3po_core.evaluation.yesno import parse_yes_no


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes.", "yes"),
        ("yes!", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is not.", "no"),
        ("There isn't a dog.", "no"),
        ("There isn\u2019t a dog.", "no"),  # curly apostrophe
        # Negation wins inside the first sentence, as in LLaVA's POPE script.
        ("yes, there is no doubt", "no"),
        ("NOT sure", "no"),
        # Only the first sentence counts; empty leading sentences are skipped.
        ("Yes. But there is no cat.", "yes"),
        ("\n\n... Yes", "yes"),
        ("There is a cat.", "unknown"),
        ("Nothing is there", "unknown"),  # "nothing" is not the word "no"
        ("I cannot tell.", "unknown"),
        ("", "unknown"),
    ],
)
def test_parse_yes_no(reply: str, expected: str) -> None:
    assert parse_yes_no(reply) == expected


def pope_record(index: int, category: str, answer: str, prediction: str) -> dict:
    return {"question_id": index, "category": category, "answer": answer, "prediction": prediction}


POPE_RECORDS = [
    pope_record(1, "random", "yes", "Yes, there is a dog."),  # true positive
    pope_record(2, "random", "yes", "No."),  # false negative
    pope_record(3, "random", "no", "No, there is not."),  # true negative
    pope_record(4, "random", "no", "Yes"),  # false positive
    pope_record(5, "adversarial", "yes", "I cannot tell."),  # unknown: false negative
    pope_record(6, "adversarial", "no", "There is a cat."),  # unknown: not a false positive
    pope_record(7, "adversarial", "YES", "yes"),  # true positive
    pope_record(8, "adversarial", "no", "There isn't any."),  # true negative
]


def test_pope_overall() -> None:
    result = pope.score(POPE_RECORDS)
    # TP = 2 (#1, #7), FN = 2 (#2, #5), TN = 2 (#3, #8), FP = 1 (#4); #6 is unknown, answer no.
    assert result["n"] == 8
    assert result["unknown"] == 2  # #5, #6
    assert result["accuracy"] == pytest.approx(4 / 8)  # (TP + TN) / n
    assert result["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert result["recall"] == pytest.approx(2 / 4)  # TP / (TP + FN)
    assert result["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert result["yes_ratio"] == pytest.approx(3 / 8)  # predicted yes: #1, #4, #7


def test_pope_per_category() -> None:
    per_category = pope.score(POPE_RECORDS)["per_category"]
    assert set(per_category) == {"random", "adversarial"}
    # random: TP 1, FN 1, TN 1, FP 1.
    assert per_category["random"] == pytest.approx(
        {"accuracy": 2 / 4, "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2,
         "yes_ratio": 2 / 4, "unknown": 0, "n": 4}
    )
    # adversarial: TP 1 (#7), FN 1 (#5, unknown), TN 1 (#8), FP 0; #6 unknown.
    assert per_category["adversarial"] == pytest.approx(
        {"accuracy": 2 / 4, "precision": 1 / 1, "recall": 1 / 2,
         "f1": 2 / 3,  # 2 * 1 * (1/2) / (1 + 1/2)
         "yes_ratio": 1 / 4, "unknown": 2, "n": 4}
    )


def test_pope_precision_without_predicted_yes_is_zero() -> None:
    records = [pope_record(1, "random", "yes", "No."), pope_record(2, "random", "no", "No.")]
    result = pope.score(records)
    assert result["precision"] == 0.0
    assert result["recall"] == 0.0
    assert result["f1"] == 0.0
    assert result["accuracy"] == pytest.approx(1 / 2)


def test_pope_rejects_bad_records() -> None:
    missing = [pope_record(1, "random", "yes", "Yes"), {"question_id": 2, "category": "random", "answer": "no"}]
    with pytest.raises(InputError, match=r"record 1: missing field 'prediction'"):
        pope.score(missing)
    with pytest.raises(InputError, match=r"record 0: field 'answer' is 'maybe'"):
        pope.score([pope_record(1, "random", "maybe", "Yes")])


def mme_record(category: str, image: str, answer: str, prediction: str) -> dict:
    return {"question_id": image, "category": category, "answer": answer, "prediction": prediction}


MME_RECORDS = [
    mme_record("existence", "1.png", "Yes", "Yes"),  # right
    mme_record("existence", "1.png", "No", "No"),  # right
    mme_record("existence", "2.png", "Yes", "Yes, there is."),  # right
    mme_record("existence", "2.png", "No", "Yes"),  # wrong
    # The same image name in another category is another image.
    mme_record("count", "1.png", "Yes", "yes"),  # right
    mme_record("count", "1.png", "No", "Unclear."),  # unknown, wrong
    mme_record("code_reasoning", "7.png", "Yes", "Yes."),  # right
    mme_record("code_reasoning", "7.png", "No", "No."),  # right
    mme_record("my_custom_task", "9.png", "Yes", "No"),  # wrong
    mme_record("my_custom_task", "9.png", "No", "No"),  # right
]


def test_mme_scores() -> None:
    result = mme.score(MME_RECORDS)
    categories = result["categories"]
    # existence: 3/4 questions right = 75; 1/2 images with both right = 50.
    assert categories["existence"] == pytest.approx(
        {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n_questions": 4, "n_images": 2}
    )
    # count: 1/2 right = 50; 0/1 images = 0.
    assert categories["count"] == pytest.approx(
        {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "n_questions": 2, "n_images": 1}
    )
    # code_reasoning: 2/2 = 100; 1/1 = 100.
    assert categories["code_reasoning"]["score"] == pytest.approx(200.0)
    # my_custom_task ("other"): 1/2 = 50; 0/1 = 0; reported but in no total.
    assert categories["my_custom_task"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(175.0)  # 125 + 50
    assert result["cognition"] == pytest.approx(200.0)
    assert result["score"] == pytest.approx(375.0)  # 175 + 200
    assert result["unknown"] == 1


def test_mme_rejects_image_without_two_questions() -> None:
    records = MME_RECORDS + [mme_record("count", "3.png", "Yes", "Yes")]
    with pytest.raises(InputError, match=r"category 'count', question_id '3.png'"):
        mme.score(records)


def test_mme_category_lists() -> None:
    assert len(mme.PERCEPTION) == 10 and len(mme.COGNITION) == 4
    assert not set(mme.PERCEPTION) & set(mme.COGNITION)
