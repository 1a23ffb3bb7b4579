"""The synthetic world's held-out benchmarks: POPE-style existence questions (random, popular,
adversarial negatives), MME-style yes/no pairs and CHAIR-style description prompts, built from eval
scenes and their scene graphs.

Limit: the questions are the world's templates (synthetic.instruction_text); the public POPE and MME
files are read by m3po_core/evaluation, not here.
"""

from __future__ import annotations

import random
from collections import Counter

from m3po_core.data.synthetic import (
    ALL_PAIRS,
    MME_CATEGORIES,
    NO_BIAS,
    POPE_CATEGORIES,
    Scene,
    WorldBias,
    answer_text,
    instruction_text,
    seeded_rng,
)
from m3po_core.data.synthetic_prompts import sample_params


def _exist_row(scene: Scene, colour: str, shape: str) -> dict:
    return {
        "scene_id": scene.scene_id,
        "instruction": instruction_text("exist", {"colour": colour, "shape": shape}),
        "answer": "yes" if scene.find(colour, shape) else "no",
        "scene": scene.to_json(),
    }


def pope_questions(scenes: list[Scene], seed: int, train_scenes: list[Scene],
                   bias: WorldBias = NO_BIAS) -> list[dict]:
    """POPE-style existence questions: per image and category, every present object
    (yes) and as many absent ones (no). Negatives: random = uniformly drawn absent
    pairs; popular = the absent pairs most frequent in ``train_scenes``;
    adversarial = absent pairs sharing a colour or a shape with a present object or, in a world
    with co-occurrence, the absent companions of present objects first (POPE's adversarial
    negatives are the objects that co-occur most with those present)."""
    frequency = Counter(pair for scene in train_scenes for pair in scene.pairs())
    by_popularity = sorted(ALL_PAIRS, key=lambda pair: (-frequency[pair], ALL_PAIRS.index(pair)))
    rows = []
    for scene in scenes:
        rng = seeded_rng(seed, "pope", scene.scene_id)
        present = [(o.colour, o.shape) for o in scene.objects]
        absent = [pair for pair in ALL_PAIRS if pair not in present]
        confusable = [
            (c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)
        ]
        negatives = {
            "random": rng.sample(absent, len(present)),
            "popular": [pair for pair in by_popularity if pair in absent][: len(present)],
            "adversarial": _adversarial(scene, confusable, len(present), rng, bias),
        }
        for category in POPE_CATEGORIES:
            for m, (colour, shape) in enumerate(present + negatives[category]):
                rows.append(
                    {
                        "question_id": f"{scene.scene_id}-{category}-{m}",
                        "category": category,
                        **_exist_row(scene, colour, shape),
                    }
                )
    return rows


def _adversarial(scene: Scene, confusable: list, n: int, rng: random.Random, bias: WorldBias) -> list:
    if not bias.active:
        return rng.sample(confusable, n)
    companions = scene.absent_companions()[:n]
    rest = [pair for pair in confusable if pair not in companions]
    return companions + rng.sample(rest, n - len(companions))


def mme_questions(scenes: list[Scene], seed: int, bias: WorldBias = NO_BIAS) -> list[dict]:
    """MME-style pairs: per image and subtask one "yes" and one "no" question,
    sharing ``question_id`` = scene_id (MME pairs share the image name). The questions are
    asked as the world asks them (in a biased world, "no" existence questions often name a
    companion)."""
    rows = []
    for scene in scenes:
        rng = seeded_rng(seed, "mme", scene.scene_id)
        for category, kind in MME_CATEGORIES.items():
            for answer in ("yes", "no"):
                params = sample_params(scene, kind, answer_yes=answer == "yes", rng=rng, bias=bias)
                rows.append(
                    {
                        "question_id": scene.scene_id,
                        "row_id": f"{scene.scene_id}-{category}-{answer}",
                        "scene_id": scene.scene_id,
                        "category": category,
                        "instruction": instruction_text(kind, params),
                        "answer": answer,
                        "scene": scene.to_json(),
                    }
                )
    return rows


def chair_prompts(scenes: list[Scene]) -> list[dict]:
    """One "describe the image in detail ." per scene, its answer the true description (CHAIR reads
    the objects there from it: m3po_core/evaluation/chair.py)."""
    return [{"question_id": scene.scene_id, "category": "describe_detail", "scene_id": scene.scene_id,
             "instruction": instruction_text("describe_detail", {}),
             "answer": answer_text(scene, "describe_detail", {}), "scene": scene.to_json()} for scene in scenes]
