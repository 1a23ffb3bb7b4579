"""POPE object-hallucination metrics: yes/no questions, "yes" is the positive class."""

from collections import defaultdict
from collections.abc import Iterable, Mapping

from m3po_core.evaluation.yesno import (
    NO,
    UNKNOWN,
    YES,
    check_records,
    parse_yes_no,
    true_answer,
)

FIELDS = ("question_id", "category", "answer", "prediction")


def score(records: Iterable[Mapping]) -> dict:
    """Score POPE predictions overall and per category.

    Each record has ``question_id``, ``category`` (e.g. "random", "popular",
    "adversarial"), ``answer`` ("yes"/"no", any case) and ``prediction`` (raw
    model text, read with ``parse_yes_no``).

    Returns ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "unknown",
    "n", "per_category": {category: {same keys}}}``. An unparseable prediction
    counts in ``unknown`` and ``n``, is never correct and is never a predicted
    "yes": it is a false negative when the answer is yes and not a false
    positive when it is no. ``yes_ratio`` = predicted yes / n. Precision with
    no predicted yes, recall with no true yes, and F1 when both are 0 are 0.0.
    """
    checked = check_records(records, FIELDS)
    by_category: dict[str, list[Mapping]] = defaultdict(list)
    for record in checked:
        by_category[str(record["category"])].append(record)
    return {
        **_metrics(checked),
        "per_category": {
            category: _metrics(group) for category, group in sorted(by_category.items())
        },
    }


def _metrics(records: list[Mapping]) -> dict:
    true_pos = false_pos = true_neg = false_neg = unknown = 0
    for record in records:
        predicted = parse_yes_no(record["prediction"])
        actual = true_answer(record)
        unknown += predicted == UNKNOWN
        if actual == YES:
            if predicted == YES:
                true_pos += 1
            else:
                false_neg += 1
        elif predicted == YES:
            false_pos += 1
        elif predicted == NO:
            true_neg += 1
    n = len(records)
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return {
        "accuracy": (true_pos + true_neg) / n,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (true_pos + false_pos) / n,
        "unknown": unknown,
        "n": n,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
