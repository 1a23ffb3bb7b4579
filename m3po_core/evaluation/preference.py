"""Simulated human preference (paper table 4): a judge rates each response 1-5 for accuracy,
relevance and helpfulness, and the trained model's responses are compared with the base model's
on the same prompts (win / tie / loss by the judge's overall rating).

The judge is the run's own (`scoring.judge`): the reference judge on the synthetic world, a vision
model through the OpenAI client otherwise. Its [0, 1] aspects map to the paper's 1-5 scale as
1 + 4 x score; helpfulness is the judge's instruction-adherence aspect. A response the judge could
not rate is counted in `unrated` and left out of the means and of the comparison, never invented.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ASPECTS = {"accuracy": "accuracy", "relevance": "relevance", "helpfulness": "adherence"}


def to_five(x: float) -> float:
    return 1.0 + 4.0 * x


def score(records: Sequence[Mapping[str, Any]], ratings: Sequence[Any]) -> dict[str, Any]:
    """Mean 1-5 rating per aspect and overall; `ratings[i]` is the JudgeScore of `records[i]` or None."""
    rated = [r for r in ratings if r is not None]
    out: dict[str, Any] = {"n": len(records), "unrated": len(records) - len(rated)}
    for name, attr in ASPECTS.items():
        out[name] = sum(to_five(getattr(r, attr)) for r in rated) / len(rated) if rated else float("nan")
    out["overall"] = sum(to_five(r.overall) for r in rated) / len(rated) if rated else float("nan")
    return out


def win_rate(trained: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Pairwise against the base model: `trained` and `base` map question_id -> overall rating (or
    None). Ties count half in `win_rate` (the usual convention), and are reported apart."""
    both = [q for q in trained if q in base and trained[q] is not None and base[q] is not None]
    wins = sum(trained[q] > base[q] for q in both)
    ties = sum(trained[q] == base[q] for q in both)
    n = len(both)
    return {"compared": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + 0.5 * ties) / n if n else float("nan")}
