"""Paired bootstrap intervals for the difference between two models answering the same questions.

Each bootstrap draw resamples the benchmark's units with replacement, the same draw for both
models, and recomputes the metric for each: the interval is the central `level` share of the
differences (trained - base). A unit is a question for POPE and an image's question pair for MME
(acc+ needs both answers), resampled within its subtask so every subtask keeps its size. The
verdict "better" belongs only to an interval that excludes zero. Limit: it measures the spread over
questions for fixed models; the spread over training seeds or machines is not in it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
import numpy as np

from m3po_core.evaluation.mme import COGNITION, PERCEPTION
from m3po_core.evaluation.yesno import NO, YES, parse_yes_no, true_answer

N_BOOT = 2000
LEVEL = 0.95


def _interval(base: np.ndarray, trained: np.ndarray, point: float, level: float) -> dict[str, float]:
    diff = trained - base
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": float(point), "low": float(lo), "high": float(hi), "level": level, "n_boot": len(diff)}


def _aligned(base: Sequence[Mapping], trained: Sequence[Mapping]) -> list[tuple[Mapping, Mapping]]:
    by_id = {(r["question_id"], r.get("category"), r.get("instruction")): r for r in trained}
    pairs = []
    for r in base:
        key = (r["question_id"], r.get("category"), r.get("instruction"))
        if key not in by_id:
            raise ValueError(f"question {r['question_id']!r} ({r.get('category')}) was answered by one model only")
        pairs.append((r, by_id[key]))
    if len(pairs) != len(trained):
        raise ValueError(f"{len(trained)} trained answers against {len(base)} base answers: not the same questions")
    return pairs


def pope_intervals(base: Sequence[Mapping], trained: Sequence[Mapping], n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Intervals of the accuracy and F1 differences (POPE's rules: m3po_core/evaluation/pope.py)."""
    pairs = _aligned(base, trained)
    gold_yes = np.array([true_answer(b) == YES for b, _ in pairs])
    draws = np.random.default_rng(seed).integers(0, len(pairs), size=(n_boot, len(pairs)))
    every = np.arange(len(pairs))
    point, boot = [], []
    for side in (0, 1):
        said = [parse_yes_no(p[side]["prediction"]) for p in pairs]
        yes = np.array([s == YES for s in said])
        correct = np.where(gold_yes, yes, np.array([s == NO for s in said]))
        point.append(_accuracy_f1(correct, yes, gold_yes, every))
        boot.append(_accuracy_f1(correct, yes, gold_yes, draws))
    return {"accuracy": _interval(boot[0][0], boot[1][0], point[1][0] - point[0][0], level),
            "f1": _interval(boot[0][1], boot[1][1], point[1][1] - point[0][1], level)}


def _accuracy_f1(correct: np.ndarray, yes: np.ndarray, gold_yes: np.ndarray, idx: np.ndarray):
    """POPE's accuracy and F1 ("yes" positive; no predicted yes or no true yes: 0) over the rows `idx`."""
    tp = (yes & gold_yes)[idx].sum(-1)
    fp = (yes & ~gold_yes)[idx].sum(-1)
    fn = (~yes & gold_yes)[idx].sum(-1)
    zeros = np.zeros(np.shape(tp), dtype=float)
    precision = np.divide(tp, tp + fp, out=zeros.copy(), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=zeros.copy(), where=(tp + fn) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=zeros.copy(), where=(precision + recall) > 0)
    return correct[idx].mean(-1), f1


def mme_intervals(base: Sequence[Mapping], trained: Sequence[Mapping], n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Interval of the MME score difference (perception + cognition, each subtask acc + acc+),
    resampling images within each subtask."""
    # subtask -> image -> (base's right answers, trained's right answers) out of its two questions
    right: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for b, t in _aligned(base, trained):
        cell = right[str(b["category"])][str(b["question_id"])]
        cell[0] += parse_yes_no(b["prediction"]) == true_answer(b)
        cell[1] += parse_yes_no(t["prediction"]) == true_answer(t)
    rng = np.random.default_rng(seed)
    totals = np.zeros((2, n_boot))
    point = np.zeros(2)
    for category, images in sorted(right.items()):
        if category not in PERCEPTION and category not in COGNITION:
            continue  # in no total, as mme.score
        counts = np.array(list(images.values()))                # (images, 2 models)
        idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
        for side in (0, 1):
            c = counts[:, side]
            score = lambda picked: 100 * picked.sum(-1) / (2 * picked.shape[-1]) + 100 * (picked == 2).mean(-1)
            totals[side] += score(c[idx])
            point[side] += score(c)
    return {"score": _interval(totals[0], totals[1], point[1] - point[0], level)}


BENCHMARKS = {"pope": pope_intervals, "mme": mme_intervals}


def intervals(bench: str, base: Sequence[Mapping], trained: Sequence[Mapping], seed: int = 0) -> dict[str, dict]:
    """The intervals of `bench` ("pope": accuracy and F1; "mme": score), trained - base."""
    return BENCHMARKS[bench](base, trained, seed=seed)


def better(interval: Mapping[str, float] | None) -> bool:
    """The trained model is better: its interval lies above zero."""
    return interval is not None and interval["low"] > 0
