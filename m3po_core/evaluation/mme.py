"""MME scores, computed as in the public MME evaluation tool, under each public harness's reading of
the replies (m3po_core/evaluation/harness_rules.py)."""

from collections import defaultdict
from collections.abc import Iterable, Mapping

from m3po_core.errors import InputError
from m3po_core.evaluation.harness_rules import RULES, check_rule, read_mme
from m3po_core.evaluation.yesno import UNKNOWN, check_records, true_answer

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
FIELDS = ("question_id", "category", "answer", "prediction")
QUESTIONS_PER_IMAGE = 2


def score(records: Iterable[Mapping], rule: str = "default") -> dict:
    """Score MME predictions, the replies read as `rule` reads them.

    Each record has ``question_id`` (the image name: an image's two questions
    share it within a category), ``category``, ``answer`` ("yes"/"no") and
    ``prediction`` (the raw reply; one the rule cannot read is wrong and counted
    in ``unknown``).

    Per category: acc = correct questions / questions * 100, acc_plus = images
    with both questions right / images * 100, score = acc + acc_plus.
    ``perception`` and ``cognition`` sum the scores of the present categories
    of ``PERCEPTION`` and ``COGNITION``; ``score`` is their sum. Categories in
    neither list (the "other" group) are reported in ``categories`` and add to
    no total, except under lmms-eval, which adds them to cognition. Every rule
    returns the same keys, with ``rule`` naming it.

    Raises InputError if an image does not have exactly two questions.
    """
    check_rule(rule)
    checked = check_records(records, FIELDS)
    # category -> image -> whether each of its questions was answered right
    answers: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unknown = 0
    for record in checked:
        predicted = read_mme(record["prediction"], rule)
        unknown += predicted == UNKNOWN
        image = answers[str(record["category"])][str(record["question_id"])]
        image.append(predicted == true_answer(record))

    categories = {
        category: _category_scores(category, images)
        for category, images in sorted(answers.items())
    }
    perception = _total(categories, PERCEPTION)
    cognition = _total(categories, COGNITION if rule != "lmms-eval"
                       else tuple(c for c in categories if c not in PERCEPTION))
    return {
        "score": perception + cognition,
        "perception": perception,
        "cognition": cognition,
        "categories": categories,
        "unknown": unknown,
        "rule": rule,
    }


def every_rule(records: Iterable[Mapping]) -> dict[str, dict]:
    """`score` under each rule, by rule name."""
    checked = list(records)
    return {rule: score(checked, rule) for rule in RULES}


def _category_scores(category: str, images: dict[str, list[bool]]) -> dict:
    for question_id, correct in images.items():
        if len(correct) != QUESTIONS_PER_IMAGE:
            raise InputError(
                f"category {category!r}, question_id {question_id!r}: "
                f"{len(correct)} questions, expected {QUESTIONS_PER_IMAGE}"
            )
    n_questions = sum(len(correct) for correct in images.values())
    acc = sum(sum(correct) for correct in images.values()) / n_questions * 100
    acc_plus = sum(all(correct) for correct in images.values()) / len(images) * 100
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc + acc_plus,
        "n_questions": n_questions,
        "n_images": len(images),
    }


def _total(categories: dict[str, dict], group: tuple[str, ...]) -> float:
    return sum(
        (result["score"] for name, result in categories.items() if name in group), 0.0
    )
