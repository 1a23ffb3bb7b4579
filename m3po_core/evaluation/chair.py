"""CHAIR-style object hallucination of open descriptions (Rohrbach et al., 2018, "Object
Hallucination in Image Captioning"), on the synthetic world's held-out scenes.

Each answer is read by the reference judge's reader (`scoring.judge.named_objects`); the objects
truly there are those the reference description names (held-out references are true to the scene).

    chair_s  share of descriptions naming at least one object that is not there   (lower is better)
    chair_i  objects named that are not there / all objects named                   (lower is better)
    recall   objects there that are named / all objects there                      (higher is better)

Limit: objects are the world's (colour, shape) pairs, so there are no synonyms to map, unlike
COCO's; positions are not counted here (the judge's graded accuracy counts them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from m3po_core.scoring.judge import named_objects

METRICS = ("chair_s", "chair_i", "recall")
LOWER_IS_BETTER = ("chair_s", "chair_i")


def counts(records: Sequence[Mapping]) -> np.ndarray:
    """Per answer: (objects named, of them not there, objects there, of them named); shape (n, 4)."""
    rows = []
    for r in records:
        named, truth = set(named_objects(r["prediction"] or "")), set(named_objects(r["answer"]))
        rows.append((len(named), len(named - truth), len(truth), len(named & truth)))
    return np.array(rows, dtype=float).reshape(-1, 4)


def _metrics(c: np.ndarray) -> dict[str, np.ndarray]:
    """The three metrics over the answers on the last-but-one axis of `c` (..., n, 4)."""
    named, invented, there, found = np.moveaxis(c, -1, 0)
    ratio = lambda a, b: np.divide(a.sum(-1), b.sum(-1), out=np.zeros(a.shape[:-1]), where=b.sum(-1) > 0)
    return {"chair_s": (invented > 0).mean(-1), "chair_i": ratio(invented, named), "recall": ratio(found, there)}


def score(records: Sequence[Mapping]) -> dict[str, float]:
    """The benchmark's figures for one model's answers (each record: "prediction", "answer")."""
    c = counts(records)
    return {**{k: float(v) for k, v in _metrics(c).items()}, "n": len(c),
            "objects_named": float(c[:, 0].mean()) if len(c) else 0.0}


def chair_runs(runs: Sequence[Sequence[Mapping]], n_boot: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every run's metrics on all the descriptions (points, shape (runs,)) and on each bootstrap draw of
    them, the same draws for every run (shape (runs, n_boot)); the runs' answers in the same order."""
    per_run = [counts(r) for r in runs]
    draws = np.random.default_rng(seed).integers(0, len(per_run[0]), size=(n_boot, len(per_run[0])))
    point = [_metrics(c) for c in per_run]
    boot = [_metrics(c[draws]) for c in per_run]
    return {m: (np.array([p[m] for p in point]), np.stack([b[m] for b in boot])) for m in METRICS}
