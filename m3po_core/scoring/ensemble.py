"""Ensembles of judges and of alignment encoders (the paper's future work), behind the same
interfaces as one judge and one encoder.

- `JudgeEnsemble`: every judge rates every candidate; each aspect (relevance, accuracy, adherence)
  is the mean over the judges that rated it, and the overall score is recomputed from those means
  with the usual weights. A candidate no judge could rate stays unrated (None), never invented.
  Usage (requests, tokens, cost) is summed over the judges.
- `EncoderEnsemble`: every encoder scores every candidate; the ensemble's score is the mean of the
  encoders' [0, 1] scores (a CLIP cosine through its `scoring.clip_mapping`, BLIP-2's match
  probability as it is), so it is already in [0, 1] and MAS takes it as it is.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from m3po_core.scoring.judge import JudgeItem, JudgeScore, weighted_score

ASPECTS = ("relevance", "accuracy", "adherence")


class JudgeEnsemble:
    def __init__(self, judges: Sequence[Any]) -> None:
        self.judges = list(judges)
        self.name = "ensemble(" + ", ".join(getattr(j, "name", type(j).__name__) for j in self.judges) + ")"

    def score(self, items: Sequence[JudgeItem]) -> list[JudgeScore | None]:
        per_judge = [j.score(items) for j in self.judges]
        out: list[JudgeScore | None] = []
        for ratings in zip(*per_judge):
            rated = [r for r in ratings if r is not None]
            if not rated:
                out.append(None)
                continue
            mean = {a: sum(getattr(r, a) for r in rated) / len(rated) for a in ASPECTS}
            out.append(weighted_score(**mean))
        return out

    @property
    def usage(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for j in self.judges:
            for k, v in dict(getattr(j, "usage", {})).items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        return total


class EncoderEnsemble:
    kind = "unit"  # already in [0, 1]

    def __init__(self, encoders: Sequence[Any], mappings: Sequence[str] | None = None) -> None:
        """`mappings`: each encoder's cosine-to-[0, 1] mapping (clip.COSINE_TO_UNIT; default affine)."""
        self.encoders = list(encoders)
        self.mappings = list(mappings or ["affine"] * len(self.encoders))
        self.metrics: dict = {}

    @staticmethod
    def unit_scores(raw: np.ndarray) -> np.ndarray:
        return raw

    @property
    def n_image_encodes(self) -> int:
        return sum(e.n_image_encodes for e in self.encoders)

    def score(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        from m3po_core.scoring.clip import unit_scores

        per_encoder = [[unit_scores(e, s, m) for s in e.score(images, texts)] for e, m in zip(self.encoders, self.mappings)]
        return [np.mean(np.stack(parts), axis=0) for parts in zip(*per_encoder)]
