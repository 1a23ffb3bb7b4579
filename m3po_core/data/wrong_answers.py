"""Descriptions of a synthetic scene that get it wrong in one known way: what the tiny CLIP learns to
score below the true description (scoring.clip.hard_negatives), so its similarity moves with what a
caption gets right or wrong about the scene, as the co-occurrence bias errs first.

Limit: one error per description, of three kinds (an absent object added, the scene's absent
companions first; an object recoloured; an object moved to a free cell, or dropped where the kind
gives no positions).
"""
from __future__ import annotations

import random

from m3po_core.data.synthetic import ALL_PAIRS, POSITIONS, Scene, SceneObject, open_answer

ERRORS = ("add_absent", "recolour", "misplace")


def wrong_descriptions(scene: Scene, kind: str, rng: random.Random, n: int) -> list[str]:
    """`n` descriptions of `scene` in the open `kind`'s form, each with one error (ERRORS in turn,
    from a random start), the objects in a random order."""
    start = rng.randrange(len(ERRORS))
    return [open_answer(kind, _with_error(scene, kind, ERRORS[(start + i) % len(ERRORS)], rng)) for i in range(n)]


def _with_error(scene: Scene, kind: str, error: str, rng: random.Random) -> list[SceneObject]:
    objects = rng.sample(scene.objects, len(scene.objects))
    present = scene.pairs()
    free = [p for p in POSITIONS if p not in {o.position for o in objects}]  # a scene has at most 3 of 4 cells
    if error == "add_absent":
        colour, shape = rng.choice(scene.absent_companions() or [p for p in ALL_PAIRS if p not in present])
        objects.insert(rng.randint(0, len(objects)), SceneObject(shape, colour, rng.choice(free)))
        return objects
    i = rng.randrange(len(objects))
    o = objects[i]
    if error == "recolour":
        colour = rng.choice([c for c, s in ALL_PAIRS if s == o.shape and (c, s) not in present])
        objects[i] = SceneObject(o.shape, colour, o.position)
    elif kind == "list":  # no positions to get wrong: leave one out
        del objects[i]
        if not objects:  # a one-object scene: name another object instead
            colour, shape = rng.choice([p for p in ALL_PAIRS if p not in present])
            objects = [SceneObject(shape, colour, o.position)]
    else:
        objects[i] = SceneObject(o.shape, o.colour, rng.choice(free))
    return objects
