"""POPE object-hallucination metrics: yes/no questions, "yes" is the positive class, under each
public harness's scoring rule (m3po_core/evaluation/harness_rules.py)."""

from collections import defaultdict
from collections.abc import Iterable, Mapping

from m3po_core.evaluation.harness_rules import RULES, YES_RATIO_MEANS, check_rule, read_pope
from m3po_core.evaluation.yesno import NO, UNKNOWN, YES, check_records, true_answer

FIELDS = ("question_id", "category", "answer", "prediction")


def score(records: Iterable[Mapping], rule: str = "default") -> dict:
    """Score POPE predictions overall and per category (split) as `rule` scores them.

    Each record has ``question_id``, ``category`` ("random", "popular", "adversarial"), ``answer``
    ("yes"/"no", any case) and ``prediction`` (the raw reply).

    Returns ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "unknown", "n", "per_category":
    {category: {same keys}}, "mean_of_splits": {"accuracy", "f1"}, "rule", "yes_ratio_means"}``
    whatever the rule. A reply the rule cannot read (``unknown``) is never correct and never a
    predicted "yes"; it is a false negative of a "yes" question except under lmms-eval, which counts
    only an exact "no" there. ``yes_ratio`` is the predicted-yes share, except under lmms-eval: the
    gold-yes share (``yes_ratio_means`` says which). Precision with no predicted yes, recall with no
    counted positive, and F1 when both are 0 are 0.0. ``mean_of_splits`` is the plain mean over the
    categories (the paper-style POPE figure is often the mean F1 of the three splits).
    """
    check_rule(rule)
    checked = check_records(records, FIELDS)
    labelled = [(read_pope(r["prediction"], rule), true_answer(r), str(r["category"])) for r in checked]
    if rule == "vlmevalkit":  # it explodes comma-joined categories before every figure
        labelled = [(said, gold, c) for said, gold, cats in labelled for c in cats.split(",")]
    by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for said, gold, category in labelled:
        by_category[category].append((said, gold))
    per_category = {c: _metrics(group, rule) for c, group in sorted(by_category.items())}
    return {
        **_metrics([(said, gold) for said, gold, _ in labelled], rule),
        "per_category": per_category,
        "mean_of_splits": {k: sum(m[k] for m in per_category.values()) / len(per_category)
                           for k in ("accuracy", "f1")},
        "rule": rule,
        "yes_ratio_means": YES_RATIO_MEANS[rule],
    }


def every_rule(records: Iterable[Mapping]) -> dict[str, dict]:
    """`score` under each rule, by rule name."""
    checked = list(records)
    return {rule: score(checked, rule) for rule in RULES}


def _metrics(labelled: list[tuple[str, str]], rule: str) -> dict:
    true_pos = false_pos = true_neg = false_neg = unknown = gold_yes = 0
    for said, gold in labelled:
        unknown += said == UNKNOWN
        gold_yes += gold == YES
        if gold == YES:
            true_pos += said == YES
            false_neg += said == NO if rule == "lmms-eval" else said != YES
        elif said == YES:
            false_pos += 1
        elif said == NO:
            true_neg += 1
    n = len(labelled)
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return {
        "accuracy": (true_pos + true_neg) / n,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (gold_yes if rule == "lmms-eval" else true_pos + false_pos) / n,
        "unknown": unknown,
        "n": n,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
