"""Paired bootstrap intervals for the difference between two models answering the same questions.

Each bootstrap draw resamples the benchmark's units with replacement, the same draw for both
models, and recomputes the metric for each: the interval is the central `level` share of the
differences (trained - base). A unit is a question for POPE and an image's question pair for MME
(acc+ needs both answers), resampled within its subtask so every subtask keeps its size. The
verdict "better" belongs only to an interval that excludes zero.

`intervals` measures the spread over questions for two fixed models. Two recipes each trained
several times (pair sets x training seeds) are compared by `group_intervals`, whose draws also
resample the training runs, so the spread over training seeds is in the interval too. Neither holds
the spread over machines.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
import numpy as np

from m3po_core.evaluation import chair
from m3po_core.evaluation.mme import COGNITION, PERCEPTION
from m3po_core.evaluation.yesno import NO, YES, parse_yes_no, true_answer

N_BOOT = 2000
LEVEL = 0.95
Answers = Sequence[Mapping]


def _interval(base: np.ndarray, trained: np.ndarray, point: float, level: float) -> dict[str, float]:
    diff = trained - base
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": float(point), "low": float(lo), "high": float(hi), "level": level, "n_boot": len(diff)}


def _key(r: Mapping) -> tuple:
    return r["question_id"], r.get("category"), r.get("instruction")


def _aligned(base: Answers, trained: Answers) -> list[tuple[Mapping, Mapping]]:
    by_id = {_key(r): r for r in trained}
    pairs = []
    for r in base:
        if _key(r) not in by_id:
            raise ValueError(f"question {r['question_id']!r} ({r.get('category')}) was answered by one model only")
        pairs.append((r, by_id[_key(r)]))
    if len(pairs) != len(trained):
        raise ValueError(f"{len(trained)} trained answers against {len(base)} base answers: not the same questions")
    return pairs


def _aligned_runs(runs: Sequence[Answers]) -> list[list[Mapping]]:
    """Every run's answers in the first run's question order (refused where the questions differ)."""
    first = runs[0]
    return [list(first)] + [[t for _, t in _aligned(first, other)] for other in runs[1:]]


def pope_runs(runs: Sequence[Answers], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Accuracy and F1 of every run (POPE's rules: m3po_core/evaluation/pope.py), on all the questions
    (points, shape (runs,)) and on each bootstrap draw of them, the same draws for every run
    (shape (runs, n_boot))."""
    runs = _aligned_runs(runs)
    gold_yes = np.array([true_answer(r) == YES for r in runs[0]])
    draws = np.random.default_rng(seed).integers(0, len(gold_yes), size=(n_boot, len(gold_yes)))
    every = np.arange(len(gold_yes))
    point, boot = [], []
    for answers in runs:
        said = [parse_yes_no(r["prediction"]) for r in answers]
        yes = np.array([s == YES for s in said])
        correct = np.where(gold_yes, yes, np.array([s == NO for s in said]))
        point.append(_accuracy_f1(correct, yes, gold_yes, every))
        boot.append(_accuracy_f1(correct, yes, gold_yes, draws))
    return {m: (np.array([p[i] for p in point]), np.stack([b[i] for b in boot])) for i, m in enumerate(("accuracy", "f1"))}


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


def mme_runs(runs: Sequence[Answers], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MME score (perception + cognition, each subtask acc + acc+) of every run, on all the images and
    on each draw of images resampled within each subtask (the same draws for every run)."""
    runs = _aligned_runs(runs)
    # subtask -> image -> every run's right answers out of its two questions
    right: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0] * len(runs)))
    for i, r in enumerate(runs[0]):
        cell = right[str(r["category"])][str(r["question_id"])]
        for side, answers in enumerate(runs):
            cell[side] += parse_yes_no(answers[i]["prediction"]) == true_answer(answers[i])
    rng = np.random.default_rng(seed)
    totals = np.zeros((len(runs), n_boot))
    point = np.zeros(len(runs))
    for category, images in sorted(right.items()):
        if category not in PERCEPTION and category not in COGNITION:
            continue  # in no total, as mme.score
        counts = np.array(list(images.values()))                # (images, runs)
        idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
        for side in range(len(runs)):
            c = counts[:, side]
            score = lambda picked: 100 * picked.sum(-1) / (2 * picked.shape[-1]) + 100 * (picked == 2).mean(-1)
            totals[side] += score(c[idx])
            point[side] += score(c)
    return {"score": (point, totals)}


def chair_runs(runs: Sequence[Answers], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CHAIR_s, CHAIR_i and object recall of every run (m3po_core/evaluation/chair.py), resampling descriptions."""
    return chair.chair_runs(_aligned_runs(runs), n_boot, seed)


BENCHMARKS = {"pope": pope_runs, "mme": mme_runs, "chair": chair_runs}
LOWER_IS_BETTER = chair.LOWER_IS_BETTER  # the other metrics: higher is better


def pope_intervals(base: Answers, trained: Answers, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Intervals of the accuracy and F1 differences, trained - base."""
    return {m: _interval(b[0], b[1], p[1] - p[0], level) for m, (p, b) in pope_runs([base, trained], n_boot, seed).items()}


def mme_intervals(base: Answers, trained: Answers, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Interval of the MME score difference, resampling images within each subtask."""
    return {m: _interval(b[0], b[1], p[1] - p[0], level) for m, (p, b) in mme_runs([base, trained], n_boot, seed).items()}


def intervals(bench: str, base: Answers, trained: Answers, seed: int = 0, n_boot: int = N_BOOT,
              level: float = LEVEL) -> dict[str, dict]:
    """The intervals of `bench` ("pope": accuracy and F1; "mme": score; "chair": chair_s, chair_i,
    recall), trained - base."""
    return {m: _interval(b[0], b[1], p[1] - p[0], level) for m, (p, b) in BENCHMARKS[bench]([base, trained], n_boot, seed).items()}


def group_intervals(bench: str, base: Sequence[Sequence[Answers]], other: Sequence[Sequence[Answers]],
                    n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict[str, dict]:
    """Intervals of (mean over `other`'s runs) - (mean over `base`'s runs), `base[g][r]` being the
    answers of training run r of group g (a group: one pair set, e.g. one sampling seed, which both
    recipes share by index). Each draw resamples the groups (the same for both recipes), each
    group's runs (within each recipe) and the questions (the same for every run): a two-stage
    bootstrap, so a recipe whose runs scatter widely over training seeds gets a wide interval.
    With one group of one run each it is `intervals`."""
    if len(base) != len(other) or not base:
        raise ValueError(f"{len(base)} groups against {len(other)}: both recipes need the same groups")
    shapes = {len(g) for g in base}, {len(g) for g in other}
    if any(len(s) != 1 or 0 in s for s in shapes):
        raise ValueError(f"every group needs the same number of runs (at least one) per recipe, got "
                         f"{[len(g) for g in base]} and {[len(g) for g in other]}")
    flat = [answers for group in (*base, *other) for answers in group]
    k_base, k_other, n_groups = len(base[0]), len(other[0]), len(base)
    idx_base = np.arange(n_groups * k_base).reshape(n_groups, k_base)
    idx_other = n_groups * k_base + np.arange(n_groups * k_other).reshape(n_groups, k_other)
    rng = np.random.default_rng([seed, 1])  # the question draws keep `seed`'s own stream
    groups = rng.integers(0, n_groups, size=(n_boot, n_groups, 1))
    picked_base = idx_base[groups, rng.integers(0, k_base, size=(n_boot, n_groups, k_base))]
    picked_other = idx_other[groups, rng.integers(0, k_other, size=(n_boot, n_groups, k_other))]
    column = np.arange(n_boot)[:, None, None]

    out = {}
    for metric, (point, boot) in BENCHMARKS[bench](flat, n_boot, seed).items():
        delta = point[idx_other].mean() - point[idx_base].mean()
        out[metric] = _interval(boot[picked_base, column].mean(axis=(1, 2)), boot[picked_other, column].mean(axis=(1, 2)),
                                delta, level)
        out[metric]["runs"] = [n_groups * k_base, n_groups * k_other]
    return out


def side(interval: Mapping[str, float], lower_is_better: bool = False) -> int:
    """+1 where a difference's interval says the first model is better (it lies above zero; below,
    where lower is better), -1 where it says worse, 0 where it holds zero."""
    above, below = interval["low"] > 0, interval["high"] < 0
    if lower_is_better:
        above, below = below, above
    return 1 if above else -1 if below else 0


def better(interval: Mapping[str, float] | None, metric: str = "") -> bool:
    """The trained model is better: its interval lies above zero (below, for a metric where lower is better)."""
    return interval is not None and side(interval, metric in LOWER_IS_BETTER) == 1
