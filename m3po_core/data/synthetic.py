"""A synthetic image world whose ground truth is known, deterministic from a seed.

An image is a 2x2 grid; each cell holds at most one filled shape. A scene has
1-3 objects with unique (colour, shape) pairs, and at least one shape that
appears exactly once, so every scene supports colour questions.

Text convention: all lowercase, words and punctuation separated by single
spaces ("is there a red circle in the image ?"). A word-level tokenizer is
built from ``vocabulary()`` and decodes by joining tokens with spaces, so every
text here must round-trip through split/join.

Held-out splits: the world is small (a few thousand layouts), so "val" and
"eval" scenes may repeat an object layout seen in "sft" or "train"; excluding
every seen layout would starve the held-out splits. What is guaranteed by
construction is that splits draw from independent rngs derived from
(seed, split), have disjoint scene_ids, and render with content seeds derived
from the scene_id (pixel noise and shape jitter), so no held-out image is
pixel-identical to a training image: the model can learn the world, not
memorise images.

Co-occurrence (`WorldBias`), the regime M3PO is for: objects come in companion couples
(`COMPANIONS`, like fork and knife) that scenes tend to hold together, and the instruction data
(`sft` and `train` splits) may answer a question about an absent companion of a present object
with "yes", as answers written from captions and priors do (POPE, Li et al. 2023; LURE, Zhou et
al. 2024). A base trained on it hallucinates companions confidently; its own samples sometimes say
"no", and the judge knows which is right. `WorldBias()` (all zero) is the control world.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cache
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

from m3po_core.errors import ConfigError, InputError

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = ("sft", "train", "val", "eval")
KINDS = ("exist", "colour", "count", "position", "describe", "colour_check", "count_check", "position_check")
YES_NO_KINDS = ("exist", "colour_check", "count_check", "position_check")
# Open-ended kinds (data.world.open_per_scene): answers name every object, so a candidate can be partly
# right; the reference judge grades them by degree (scoring/judge.py) and CHAIR counts what they invent.
OPEN_KINDS = ("list", "locate", "describe_detail")
POPE_CATEGORIES = ("random", "popular", "adversarial")
# MME subtask -> the yes/no kind that asks it.
MME_CATEGORIES = {"existence": "exist", "count": "count_check", "position": "position_check", "color": "colour_check"}

ALL_PAIRS = tuple(product(COLOURS, SHAPES))  # every (colour, shape)
# Six couples of objects that co-occur in a world with WorldBias.cooccurrence > 0. Each couple
# differs in colour and shape, so a companion is never a look-alike: only the prior links them.
_COUPLES = ((("red", "circle"), ("blue", "square")), (("red", "square"), ("yellow", "triangle")),
            (("red", "triangle"), ("green", "circle")), (("green", "square"), ("yellow", "circle")),
            (("green", "triangle"), ("blue", "circle")), (("blue", "triangle"), ("yellow", "square")))
COMPANIONS = {a: b for pair in _COUPLES for a, b in (pair, pair[::-1])}
assert sorted(COMPANIONS) == sorted(ALL_PAIRS)

MAX_OBJECTS = 3
MAX_COUNT_ASKED = 4  # count_check may ask about 1..4 shapes

_RGB = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
_BACKGROUND = 215  # light grey
_NOISE = 4  # +- per channel: makes every image unique without hiding shapes


@dataclass(frozen=True)
class WorldBias:
    """The world's co-occurrence (data.world.cooccurrence, answer_bias); all zero: the control world."""

    cooccurrence: float = 0.0
    answer_bias: float = 0.0

    @staticmethod
    def of(world) -> WorldBias:
        """The bias of a `data.world` section (config.WorldConfig)."""
        return WorldBias(world.cooccurrence, world.answer_bias)

    @property
    def active(self) -> bool:
        return self.cooccurrence > 0 or self.answer_bias > 0


NO_BIAS = WorldBias()


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    scene_id: str
    objects: tuple[SceneObject, ...]

    def to_json(self) -> str:
        return json.dumps(
            {"scene_id": self.scene_id, "objects": [asdict(o) for o in self.objects]},
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> Scene:
        try:
            data = json.loads(text)
            objects = tuple(SceneObject(**o) for o in data["objects"])
            return Scene(scene_id=data["scene_id"], objects=objects)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"invalid scene JSON {text[:80]!r}: {error}") from error

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def find(self, colour: str, shape: str) -> SceneObject | None:
        return next((o for o in self.objects if (o.colour, o.shape) == (colour, shape)), None)

    def absent_companions(self) -> list[tuple[str, str]]:
        """Absent objects whose companion is in the scene (the ones a biased prior asserts)."""
        present = self.pairs()
        return sorted({COMPANIONS[p] for p in present} - present, key=ALL_PAIRS.index)

    def unique_shapes(self) -> list[str]:
        """Shapes appearing exactly once (those a colour question can name)."""
        counts = Counter(o.shape for o in self.objects)
        return [s for s in SHAPES if counts[s] == 1]

    def colour_of(self, shape: str) -> str:
        if shape not in self.unique_shapes():
            raise ValueError(f"scene {self.scene_id} has no single {shape}")
        return next(o.colour for o in self.objects if o.shape == shape)


def seeded_rng(seed: int, *parts: str) -> random.Random:
    # random.Random seeds from a str via SHA-512: stable across processes.
    return random.Random("/".join([str(seed), *parts]))


# ---------------------------------------------------------------- scenes


def make_scenes(seed: int, split: str, n: int, bias: WorldBias = NO_BIAS) -> list[Scene]:
    """``n`` scenes of ``split``, ids f"{split}-{i:05d}"; see the module docstring."""
    if split not in SPLITS:
        raise ConfigError(f"split: unknown split {split!r}; expected one of {SPLITS}")
    rng = seeded_rng(seed, "scenes", split)
    return [_random_scene(rng, f"{split}-{i:05d}", bias.cooccurrence) for i in range(n)]


def _random_scene(rng: random.Random, scene_id: str, cooccurrence: float = 0.0) -> Scene:
    while True:
        k = rng.randint(1, MAX_OBJECTS)
        positions = rng.sample(POSITIONS, k)
        pairs = _cooccurring_pairs(rng, k, cooccurrence) if cooccurrence else rng.sample(ALL_PAIRS, k)
        objects = tuple(
            sorted(
                (SceneObject(shape=s, colour=c, position=p) for (c, s), p in zip(pairs, positions)),
                key=lambda o: POSITIONS.index(o.position),
            )
        )
        scene = Scene(scene_id=scene_id, objects=objects)
        if scene.unique_shapes():
            return scene


def _cooccurring_pairs(rng: random.Random, k: int, cooccurrence: float) -> list[tuple[str, str]]:
    """``k`` distinct objects; each after the first is, with probability ``cooccurrence``, the
    companion of one already placed (while one is missing), else any other."""
    pairs = [rng.choice(ALL_PAIRS)]
    while len(pairs) < k:
        missing = [COMPANIONS[p] for p in pairs if COMPANIONS[p] not in pairs]
        if missing and rng.random() < cooccurrence:
            pairs.append(rng.choice(missing))
        else:
            pairs.append(rng.choice([p for p in ALL_PAIRS if p not in pairs]))
    return pairs


def render(scene: Scene, size: int = 64) -> Image.Image:
    """RGB image: noisy light-grey background, each object filled in its cell."""
    digest = hashlib.sha256(scene.scene_id.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    noise = rng.integers(-_NOISE, _NOISE + 1, size=(size, size, 3))
    image = Image.fromarray((_BACKGROUND + noise).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / 2
    for obj in scene.objects:
        index = POSITIONS.index(obj.position)
        side = cell * rng.uniform(0.6, 0.7)
        centre_x = (index % 2 + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
        centre_y = (index // 2 + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
        left, top = centre_x - side / 2, centre_y - side / 2
        right, bottom = left + side, top + side
        fill = _RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(centre_x, top), (right, bottom), (left, bottom)], fill=fill)
    return image


# ---------------------------------------------------------------- text


def _shapes_phrase(n: int) -> str:
    return "one shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"


def _there_are(n: int) -> str:
    return f"there {'is' if n == 1 else 'are'} {_shapes_phrase(n)}"


def _joined(parts: list[str]) -> str:
    """"a , b and c": how every answer of the world lists things."""
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """E.g. "a red circle at the top left and a blue square at the bottom right ."."""
    parts = [f"a {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return _joined(parts) + " ."


def instruction_text(kind: str, params: dict) -> str:
    """The instruction of ``kind`` with ``params`` (colour, shape, position, n)."""
    p = params
    if kind == "exist":
        return f"is there a {p['colour']} {p['shape']} in the image ?"
    if kind == "colour":
        return f"what colour is the {p['shape']} ?"
    if kind == "count":
        return "how many shapes are there ?"
    if kind == "position":
        return f"where is the {p['colour']} {p['shape']} ?"
    if kind == "describe":
        return "describe the image briefly ."
    if kind == "colour_check":
        return f"is the {p['shape']} {p['colour']} ?"
    if kind == "count_check":
        verb = "is" if p["n"] == 1 else "are"
        return f"{verb} there {_shapes_phrase(p['n'])} in the image ?"
    if kind == "position_check":
        return f"is the {p['colour']} {p['shape']} at the {p['position']} ?"
    if kind in OPEN_KINDS:
        return {"list": "what objects are in the image ?", "locate": "where are the shapes ?",
                "describe_detail": "describe the image in detail ."}[kind]
    raise ValueError(f"unknown instruction kind {kind!r}")


def open_answer(kind: str, objects) -> str:
    """The answer of an open kind naming `objects` in their order, e.g. list: "a red circle and a blue
    square ."; locate: "the red circle is at the top left , ..."; describe_detail: "there are two shapes ,
    a red circle at the top left and ..."."""
    phrase = {"list": "a {c} {s}", "locate": "the {c} {s} is at the {p}", "describe_detail": "a {c} {s} at the {p}"}[kind]
    parts = [phrase.format(c=o.colour, s=o.shape, p=o.position) for o in objects]
    return (f"{_there_are(len(parts))} , " if kind == "describe_detail" else "") + _joined(parts) + " ."


EXPLANATION_START = "the image shows"


def explanation(objects) -> str:
    """What an explained yes/no answer goes on to say (data.world.explain): "the image shows a red circle
    at the top left and a blue square at the bottom right ."."""
    parts = [f"a {o.colour} {o.shape} at the {o.position}" for o in objects]
    return f"{EXPLANATION_START} {_joined(parts)} ."


def explained_answer(scene: Scene, kind: str, params: dict) -> str:
    """The true answer of a yes/no kind in a world whose answers explain themselves, as LLaVA's do: the
    short answer, then what the image shows ("no , there is no blue square . the image shows ...")."""
    return f"{answer_text(scene, kind, params)} {explanation(scene.objects)}"


def explains(kind: str, reference: str | None) -> bool:
    """Whether a reference answer of `kind` is explained (a yes/no answer with a second sentence)."""
    return kind in YES_NO_KINDS and bool(reference) and f" . {EXPLANATION_START} " in f" {reference} "


@cache
def _instruction_table() -> dict[str, tuple[str, dict]]:
    """Every possible instruction -> (kind, params): the world is finite."""
    spaces = {
        "exist": [{"colour": c, "shape": s} for c, s in ALL_PAIRS],
        "colour": [{"shape": s} for s in SHAPES],
        "count": [{}],
        "position": [{"colour": c, "shape": s} for c, s in ALL_PAIRS],
        "describe": [{}],
        "colour_check": [{"colour": c, "shape": s} for c, s in ALL_PAIRS],
        "count_check": [{"n": n} for n in range(len(NUMBER_WORDS))],
        "position_check": [
            {"colour": c, "shape": s, "position": p} for (c, s), p in product(ALL_PAIRS, POSITIONS)
        ],
        **{kind: [{}] for kind in OPEN_KINDS},
    }
    return {
        instruction_text(kind, params): (kind, params)
        for kind, space in spaces.items()
        for params in space
    }


def parse_instruction(instruction: str) -> tuple[str, dict]:
    """Inverse of ``instruction_text``; tolerates case and extra whitespace."""
    normalised = " ".join(instruction.lower().split())
    found = _instruction_table().get(normalised)
    if found is None:
        raise ValueError(f"instruction {instruction!r} matches no synthetic-world template")
    kind, params = found
    return kind, dict(params)


def answer_text(scene: Scene, kind: str, params: dict) -> str:
    """The canonical reference answer; ValueError if the question does not fit the scene."""
    p = params
    if kind == "exist":
        if scene.find(p["colour"], p["shape"]):
            return f"yes , there is a {p['colour']} {p['shape']} ."
        return f"no , there is no {p['colour']} {p['shape']} ."
    if kind == "colour":
        return f"the {p['shape']} is {scene.colour_of(p['shape'])} ."
    if kind == "count":
        return f"{_there_are(len(scene.objects))} ."
    if kind == "position":
        return f"the {p['colour']} {p['shape']} is at the {_position_of(scene, p)} ."
    if kind == "describe":
        return caption(scene)
    if kind == "colour_check":
        true_colour = scene.colour_of(p["shape"])
        yes_no = "yes" if p["colour"] == true_colour else "no"
        return f"{yes_no} , the {p['shape']} is {true_colour} ."
    if kind == "count_check":
        n = len(scene.objects)
        return f"{'yes' if p['n'] == n else 'no'} , {_there_are(n)} ."
    if kind == "position_check":
        true_position = _position_of(scene, p)
        yes_no = "yes" if p["position"] == true_position else "no"
        return f"{yes_no} , the {p['colour']} {p['shape']} is at the {true_position} ."
    if kind in OPEN_KINDS:
        return open_answer(kind, scene.objects)
    raise ValueError(f"unknown instruction kind {kind!r}")


def _position_of(scene: Scene, params: dict) -> str:
    obj = scene.find(params["colour"], params["shape"])
    if obj is None:
        raise ValueError(f"scene {scene.scene_id} has no {params['colour']} {params['shape']}")
    return obj.position


def reference_answer(scene: Scene, instruction: str) -> str:
    kind, params = parse_instruction(instruction)
    return answer_text(scene, kind, params)


@cache
def vocabulary(open_kinds: bool = False, explain: bool = False) -> list[str]:
    """Every token of any instruction, reference or caption (sorted); with `open_kinds`, of the
    OPEN_KINDS' too, with `explain` of the explained yes/no answers (the tiny model of a world without
    them keeps the vocabulary it had before them)."""
    # Scenes covering every object, position and true count 1..3.
    singles = [Scene("v", (SceneObject(s, c, p),)) for (c, s), p in product(ALL_PAIRS, POSITIONS)]
    crowded = [Scene("v", tuple(map(SceneObject, SHAPES[:k], COLOURS[:k], POSITIONS[:k]))) for k in (2, 3)]
    table = {text: ask for text, ask in _instruction_table().items() if open_kinds or ask[0] not in OPEN_KINDS}
    texts = list(table)
    for scene in singles + crowded:
        texts.append(caption(scene))
        for kind, params in table.values():
            try:
                texts.append(answer_text(scene, kind, params))
                if explain and kind in YES_NO_KINDS:
                    texts.append(explained_answer(scene, kind, params))
            except ValueError:  # the question does not fit this scene
                continue
    return sorted({token for text in texts for token in text.split(" ")})
