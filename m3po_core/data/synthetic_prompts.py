"""The synthetic world's prompts: questions about a scene, their answers as the instruction data
writes them (with the world's co-occurrence bias), deterministic from a seed.

Limit: what the world is (scenes, images, the text of instructions and true answers) lives in
synthetic.py; this module picks the questions a split asks and writes its reference answers.
"""

from __future__ import annotations

import random
from collections import Counter

from m3po_core.data.synthetic import (
    ALL_PAIRS, COLOURS, KINDS, MAX_COUNT_ASKED, NO_BIAS, OPEN_KINDS, POSITIONS, YES_NO_KINDS, Scene,
    SceneObject, WorldBias, answer_text, explanation, instruction_text, open_answer, seeded_rng,
)
from m3po_core.errors import ConfigError

COMPANION_QUESTION_SHARE = 0.5  # in a biased world, half of the "no" existence questions ask about a companion

def sample_params(scene: Scene, kind: str, answer_yes: bool, rng: random.Random,
                   bias: WorldBias = NO_BIAS) -> dict:
    """Question parameters for ``kind``; ``answer_yes`` picks the answer of yes/no kinds. In a
    biased world some "no" existence questions ask about an absent companion."""
    obj = rng.choice(scene.objects)
    if kind in ("exist", "position"):
        if answer_yes or kind == "position":
            return {"colour": obj.colour, "shape": obj.shape}
        absent = [pair for pair in ALL_PAIRS if pair not in scene.pairs()]
        if bias.active and scene.absent_companions() and rng.random() < COMPANION_QUESTION_SHARE:
            absent = scene.absent_companions()
        colour, shape = rng.choice(absent)
        return {"colour": colour, "shape": shape}
    if kind in ("colour", "colour_check"):
        shape = rng.choice(scene.unique_shapes())
        if kind == "colour":
            return {"shape": shape}
        true_colour = scene.colour_of(shape)
        if answer_yes:
            return {"shape": shape, "colour": true_colour}
        return {"shape": shape, "colour": rng.choice([c for c in COLOURS if c != true_colour])}
    if kind in ("count", "describe"):
        return {}
    if kind == "count_check":
        n = len(scene.objects)
        wrong = [m for m in range(1, MAX_COUNT_ASKED + 1) if m != n]
        return {"n": n if answer_yes else rng.choice(wrong)}
    if kind == "position_check":
        wrong = [p for p in POSITIONS if p != obj.position]
        position = obj.position if answer_yes else rng.choice(wrong)
        return {"colour": obj.colour, "shape": obj.shape, "position": position}
    raise ValueError(f"unknown instruction kind {kind!r}")


def make_prompts(
    scenes: list[Scene], seed: int, kinds: tuple[str, ...] = KINDS, per_scene: int = 2,
    bias: WorldBias = NO_BIAS, open_per_scene: int = 0, explain: bool = False,
) -> list[dict]:
    """``per_scene`` prompts of distinct ``kinds`` per scene (yes/no kinds alternate yes, no), then
    ``open_per_scene`` of distinct OPEN_KINDS (their own rng stream, so the first ones do not move).
    With ``bias.answer_bias`` (instruction data only) an absent companion may be answered "yes", or
    named by an open answer (`open_reference`). With `explain` the yes/no answers go on to say what the
    image shows (`explained_reference`, its own rng stream)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ConfigError(f"kinds: unknown instruction kinds {unknown}; expected some of {KINDS}")
    asked: Counter[str] = Counter()  # per kind, so yes/no answers stay balanced
    prompts = []
    for scene in scenes:
        rng = seeded_rng(seed, "prompts", scene.scene_id)
        kinds_asked = rng.sample(list(kinds), min(per_scene, len(kinds)))
        explain_rng = seeded_rng(seed, "explain", scene.scene_id)
        for j, kind in enumerate(kinds_asked):
            params = sample_params(scene, kind, answer_yes=asked[kind] % 2 == 0, rng=rng, bias=bias)
            asked[kind] += 1
            reference = answer_text(scene, kind, params)
            asserted = None
            if (kind == "exist" and bias.answer_bias
                    and (params["colour"], params["shape"]) in scene.absent_companions()
                    and rng.random() < bias.answer_bias):
                reference = f"yes , there is a {params['colour']} {params['shape']} ."
                asserted = (params["colour"], params["shape"])
            if explain and kind in YES_NO_KINDS:
                reference = explained_reference(scene, kind, params, reference, explain_rng, bias, asserted)
            prompts.append(_prompt(scene, j, kind, params, reference))
        open_rng = seeded_rng(seed, "open", scene.scene_id)
        for j, kind in enumerate(open_rng.sample(OPEN_KINDS, min(open_per_scene, len(OPEN_KINDS))), len(kinds_asked)):
            prompts.append(_prompt(scene, j, kind, {}, open_reference(scene, kind, open_rng, bias)))
    return prompts


def _prompt(scene: Scene, n: int, kind: str, params: dict, reference: str) -> dict:
    return {"prompt_id": f"{scene.scene_id}-q{n}", "scene_id": scene.scene_id, "kind": kind,
            "instruction": instruction_text(kind, params), "reference": reference, "scene": scene.to_json()}


def open_reference(scene: Scene, kind: str, rng: random.Random, bias: WorldBias = NO_BIAS) -> str:
    """An answer of an open kind as annotators write it (`annotated_objects`)."""
    return open_answer(kind, annotated_objects(scene, rng, bias))


def explained_reference(scene: Scene, kind: str, params: dict, head: str, rng: random.Random,
                        bias: WorldBias = NO_BIAS, asserted: tuple[str, str] | None = None) -> str:
    """A yes/no answer `head` explained as annotators write it (`annotated_objects`): an object the
    head asserts is named (in a free cell), one it denies is not."""
    denied = (params["colour"], params["shape"]) if kind == "exist" and head.startswith("no") else None
    return f"{head} {explanation(annotated_objects(scene, rng, bias, asserted, denied))}"


def annotated_objects(scene: Scene, rng: random.Random, bias: WorldBias = NO_BIAS,
                      asserted: tuple[str, str] | None = None, denied: tuple[str, str] | None = None) -> list:
    """The objects an annotator's description names: the scene's in any order and, where the scene lacks
    the companion of an object it holds and has a free cell, that companion added there with chance
    answer_bias (the rate at which the world's existence answers assert it), never `denied`;
    `asserted`, if given, is added instead."""
    objects = rng.sample(scene.objects, len(scene.objects))
    free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
    companions = [c for c in scene.absent_companions() if c != denied]
    added = asserted
    if added is None and bias.answer_bias and free and companions and rng.random() < bias.answer_bias:
        added = rng.choice(companions)
    if added is not None and free:
        colour, shape = added
        objects.insert(rng.randint(0, len(objects)), SceneObject(shape, colour, rng.choice(free)))
    return objects
