"""Judges rate a response to an (image, instruction) on three axes in [0, 1].

``Judge`` is the one interface; ``ReferenceJudge`` rates synthetic-world
responses exactly, against the scene graph the image was rendered from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from m3po_core.data.synthetic import (
    COLOURS,
    NUMBER_WORDS,
    OPEN_KINDS,
    POSITIONS,
    SHAPES,
    YES_NO_KINDS,
    Scene,
    answer_text,
    explained_answer,
    explains,
    parse_instruction,
)
from m3po_core.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

ACCURACY_WEIGHT = 0.6
RELEVANCE_WEIGHT = 0.2
ADHERENCE_WEIGHT = 0.2
MAX_LENGTH_RATIO = 2.0  # responses longer than this times the reference lose adherence
REPEAT_NGRAM = 5  # a repeated 5-gram means the model is looping (no reference repeats one)
# An explained yes/no answer (data.world.explain): its accuracy is this much the yes/no sentence's and the
# rest the explanation's, graded like `locate`; a right answer badly explained beats a wrong one well explained.
ANSWER_SHARE = 0.6
_COUNT_KINDS = ("count", "count_check")  # kinds answered without naming an object


@dataclass(frozen=True)
class JudgeItem:
    prompt_id: str
    instruction: str
    response: str
    image: Image.Image | None = None
    # The reference judge reads meta["scene"] (Scene.to_json()) and, for the form of a yes/no answer
    # (explained or not), meta["reference"]; other keys are ignored.
    meta: dict | None = None


@dataclass(frozen=True)
class JudgeScore:
    relevance: float  # visual relevance in [0,1]
    accuracy: float  # semantic accuracy in [0,1]
    adherence: float  # instruction adherence in [0,1]
    overall: float  # ACCURACY/RELEVANCE/ADHERENCE_WEIGHT-weighted mean in [0,1]


def weighted_score(relevance: float, accuracy: float, adherence: float) -> JudgeScore:
    overall = (
        ACCURACY_WEIGHT * accuracy + RELEVANCE_WEIGHT * relevance + ADHERENCE_WEIGHT * adherence
    )
    return JudgeScore(relevance=relevance, accuracy=accuracy, adherence=adherence, overall=overall)


class Judge(Protocol):
    name: str

    def score(self, items: Sequence[JudgeItem]) -> list[JudgeScore | None]:
        """One score per item; None where the judge could not rate (never invented)."""
        ...


# ---------------------------------------------------------------- reading a response


@dataclass
class Mention:
    """An object named in a response: "red circle" or "circle is (not) red"."""

    colour: str
    shape: str
    negated: bool  # "no red circle", "not a red circle", "circle is not red"
    position: str | None = None  # a position phrase following the mention


@dataclass
class Reading:
    tokens: list[str]
    mentions: list[Mention] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    loose_positions: list[str] = field(default_factory=list)  # not attached to a mention
    bare_colours: list[str] = field(default_factory=list)  # colour words outside mentions
    numbers: list[int] = field(default_factory=list)


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def read_tokens(tokens: list[str]) -> Reading:
    reading = Reading(tokens)
    in_mention: set[int] = set()
    padded = tokens + ["", "", ""]  # lookahead without bounds checks
    for i, token in enumerate(tokens):
        if token in COLOURS and padded[i + 1] in SHAPES:
            negated = any(t in ("no", "not") for t in tokens[max(0, i - 2) : i])
            reading.mentions.append(Mention(token, padded[i + 1], negated))
            in_mention.add(i)
        elif token in SHAPES and padded[i + 1] == "is":
            negated = padded[i + 2] == "not"
            colour = padded[i + 3] if negated else padded[i + 2]
            if colour in COLOURS:
                reading.mentions.append(Mention(colour, token, negated))
                in_mention.add(i + 3 if negated else i + 2)
        elif f"{token} {padded[i + 1]}" in POSITIONS:
            position = f"{token} {padded[i + 1]}"
            reading.positions.append(position)
            if reading.mentions and reading.mentions[-1].position is None:
                reading.mentions[-1].position = position
            else:
                reading.loose_positions.append(position)
        elif token in NUMBER_WORDS:
            reading.numbers.append(NUMBER_WORDS.index(token))
    reading.bare_colours = [t for i, t in enumerate(tokens) if t in COLOURS and i not in in_mention]
    return reading


def _stated(about_subject: set, loose: list) -> set:
    """Values stated about the asked subject plus those said of nothing in particular."""
    return about_subject | set(loose)


def _open_accuracy(stated: set, true_value) -> float:
    # Hedging over several values splits the credit.
    return 1.0 / len(stated) if true_value in stated else 0.0


def _check_accuracy(
    said_yes: bool,
    truth_yes: bool,
    asked,
    affirmed: set,
    denied: set,
    is_true: Callable[[object], bool],
) -> float:
    if said_yes != truth_yes:
        return 0.0
    if said_yes:
        consistent = affirmed <= {asked} and asked not in denied
    else:
        consistent = asked not in affirmed
    if not consistent:  # "yes , there is no red circle ."
        return 0.0
    facts_right = all(map(is_true, affirmed)) and not any(map(is_true, denied))
    return 1.0 if facts_right else 0.5


class ReferenceJudge:
    """Rates a free-text response against the scene graph in ``meta["scene"]``.

    The instruction is parsed back into its kind and parameters; the response
    is read tolerantly (case, punctuation spacing, garbage around the answer).

    accuracy — is the asked fact right:
      * yes/no kinds (exist, *_check): the first "yes"/"no" must be right (else 0);
        the explanation after it must not contradict it ("yes , there is no red
        circle ." is 0); if it states a wrong fact that does not contradict the
        answer ("no , the circle is green ." when it is blue) it is 0.5, else 1;
      * colour / count / position: 1 if the only value stated for the asked
        object is right, 1/k if the right one is among k hedged values, else 0;
      * describe: F1 of the (colour, shape, position) triples stated vs the scene;
      * explained yes/no answers (the prompt's reference, meta["reference"], explains itself:
        synthetic.explains): ANSWER_SHARE of the first sentence's accuracy as above, the rest the
        explanation's, graded by degree like `locate`;
      * open kinds (list, locate, describe_detail), by degree: each object named counts 1 if it is
        in the scene (and, for locate and describe_detail, placed right; 0.5 if placed wrong or not
        placed), 0 if it is not there (a hallucination); accuracy is the F1 of that credit against
        the objects named and the objects there, and for describe_detail 0.8 of it plus 0.2 if the
        stated count is right.
    relevance — of the objects mentioned, the fraction whose stated presence is
      true: "red circle" claims presence, "no red circle" claims absence, so
      echoing the question in a correct "no , there is no red circle ." is fine.
      With no object mentioned: 1 for count questions (they need none), else 0.
    adherence — form × style. form (0/1): yes/no first for yes/no kinds, a colour
      word / number word / position phrase for colour / count / position, an
      object for describe. style: mean of ends with ".", at most
      MAX_LENGTH_RATIO × the reference's length, no repeated REPEAT_NGRAM-gram.
    overall = ACCURACY_WEIGHT·accuracy + RELEVANCE_WEIGHT·relevance
      + ADHERENCE_WEIGHT·adherence. The reference answer scores 1.0; an empty
      response scores 0 everywhere.

    Raises InputError naming the prompt_id when meta has no scene or the
    instruction is not a synthetic-world question about that scene.
    """

    name = "reference"

    def __init__(self) -> None:
        self._ratings = 0

    @property
    def usage(self) -> dict:
        """One request per rating (what an OpenAI judge with one candidate per call sends): the judge
        budget and the bench of adaptive sampling count them; no tokens, no cost."""
        return {"requests": self._ratings, "rated": self._ratings, "cost": None}

    def score(self, items: Sequence[JudgeItem]) -> list[JudgeScore | None]:
        out = [self._score_one(item) for item in items]
        self._ratings += len(out)
        return out

    def _score_one(self, item: JudgeItem) -> JudgeScore:
        scene_json = (item.meta or {}).get("scene")
        if not scene_json:
            raise InputError(f"prompt {item.prompt_id}: the reference judge needs meta['scene']")
        scene = Scene.from_json(scene_json)
        try:
            kind, params = parse_instruction(item.instruction)
            explained = explains(kind, (item.meta or {}).get("reference"))
            reference = (explained_answer if explained else answer_text)(scene, kind, params)
        except ValueError as error:
            raise InputError(f"prompt {item.prompt_id}: {error}") from error
        tokens = tokenize(item.response)
        if not tokens:
            return weighted_score(0.0, 0.0, 0.0)
        reading = read_tokens(tokens)
        if explained:
            answer, explanation = split_explained(tokens)
            accuracy = (ANSWER_SHARE * accuracy_of(read_tokens(answer), scene, kind, params, reference)
                        + (1 - ANSWER_SHARE) * _graded_accuracy(read_tokens(explanation), scene, "locate"))
        else:
            accuracy = accuracy_of(reading, scene, kind, params, reference)
        return weighted_score(
            relevance=_relevance(reading, scene, kind),
            accuracy=accuracy,
            adherence=_adherence(reading, kind, reference),
        )


def split_explained(tokens: list[str]) -> tuple[list[str], list[str]]:
    """An explained answer's tokens: (its first sentence, up to and with the first ".", the rest)."""
    end = tokens.index(".") + 1 if "." in tokens else len(tokens)
    return tokens[:end], tokens[end:]


def _relevance(reading: Reading, scene: Scene, kind: str) -> float:
    if not reading.mentions:
        return 1.0 if kind in _COUNT_KINDS else 0.0
    present = scene.pairs()
    true = [((m.colour, m.shape) in present) != m.negated for m in reading.mentions]
    return sum(true) / len(true)


def accuracy_of(reading: Reading, scene: Scene, kind: str, params: dict, reference: str) -> float:
    if kind in YES_NO_KINDS:
        return _yes_no_accuracy(reading, scene, kind, params, reference)
    if kind in OPEN_KINDS:
        return _graded_accuracy(reading, scene, kind)
    if kind == "describe":
        stated = {(m.colour, m.shape, m.position) for m in reading.mentions if not m.negated}
        truth = {(o.colour, o.shape, o.position) for o in scene.objects}
        hits = len(stated & truth)
        if not hits:
            return 0.0
        precision, recall = hits / len(stated), hits / len(truth)
        return 2 * precision * recall / (precision + recall)
    affirmed = [m for m in reading.mentions if not m.negated]
    if kind == "colour":
        colours = {m.colour for m in affirmed if m.shape == params["shape"]}
        return _open_accuracy(
            _stated(colours, reading.bare_colours), scene.colour_of(params["shape"])
        )
    if kind == "count":
        return _open_accuracy(set(reading.numbers), len(scene.objects))
    # position
    asked = (params["colour"], params["shape"])
    positions = {m.position for m in affirmed if (m.colour, m.shape) == asked and m.position}
    return _open_accuracy(
        _stated(positions, reading.loose_positions), scene.find(*asked).position
    )


def named_objects(text: str) -> dict[tuple[str, str], str | None]:
    """The objects a response says are there ((colour, shape) -> the first position given to it, or
    None), in the order named; negated mentions ("no red circle") are not claims."""
    return _named(read_tokens(tokenize(text)))


def _named(reading: Reading) -> dict[tuple[str, str], str | None]:
    named: dict[tuple[str, str], str | None] = {}
    for m in reading.mentions:
        if not m.negated and named.get((m.colour, m.shape)) is None:
            named[(m.colour, m.shape)] = m.position
    return named


def _graded_accuracy(reading: Reading, scene: Scene, kind: str) -> float:
    named = _named(reading)
    truth = {(o.colour, o.shape): o.position for o in scene.objects}
    placed = kind != "list"
    credit = sum(1.0 if not placed or position == truth[pair] else 0.5
                 for pair, position in named.items() if pair in truth)
    f1 = 2 * credit / (len(named) + len(truth)) if credit else 0.0  # F1 of precision credit/named, recall credit/truth
    if kind == "describe_detail":
        return 0.8 * f1 + 0.2 * float(reading.numbers[:1] == [len(scene.objects)])
    return f1


def _yes_no_accuracy(
    reading: Reading, scene: Scene, kind: str, params: dict, reference: str
) -> float:
    answers = [i for i, t in enumerate(reading.tokens) if t in ("yes", "no")]
    if not answers:
        return 0.0
    said_yes = reading.tokens[answers[0]] == "yes"
    truth_yes = reference.startswith("yes")
    # The explanation is what follows the yes/no word.
    explanation = read_tokens(reading.tokens[answers[0] + 1 :])
    affirmed = [m for m in explanation.mentions if not m.negated]
    denied = [m for m in explanation.mentions if m.negated]
    if kind == "exist":
        asked = (params["colour"], params["shape"])
        return _check_accuracy(
            said_yes,
            truth_yes,
            asked,
            {(m.colour, m.shape) for m in affirmed if (m.colour, m.shape) == asked},
            {(m.colour, m.shape) for m in denied if (m.colour, m.shape) == asked},
            lambda pair: pair in scene.pairs(),
        )
    if kind == "colour_check":
        shape = params["shape"]
        of_shape = {m.colour for m in affirmed if m.shape == shape}
        return _check_accuracy(
            said_yes,
            truth_yes,
            params["colour"],
            _stated(of_shape, explanation.bare_colours),
            {m.colour for m in denied if m.shape == shape},
            lambda colour: colour == scene.colour_of(shape),
        )
    if kind == "count_check":
        return _check_accuracy(
            said_yes,
            truth_yes,
            params["n"],
            set(explanation.numbers),
            set(),
            lambda n: n == len(scene.objects),
        )
    # position_check
    pair = (params["colour"], params["shape"])
    of_pair = {m.position for m in affirmed if (m.colour, m.shape) == pair and m.position}
    return _check_accuracy(
        said_yes,
        truth_yes,
        params["position"],
        _stated(of_pair, explanation.loose_positions),
        set(),
        lambda position: position == scene.find(*pair).position,
    )


def _adherence(reading: Reading, kind: str, reference: str) -> float:
    tokens = reading.tokens
    if kind in YES_NO_KINDS:
        form = tokens[0] in ("yes", "no")
    elif kind == "colour":
        form = any(t in COLOURS for t in tokens)
    elif kind == "count":
        form = bool(reading.numbers)
    elif kind == "position":
        form = bool(reading.positions)
    else:  # describe
        form = any(not m.negated for m in reading.mentions)
    ngrams = [tuple(tokens[i : i + REPEAT_NGRAM]) for i in range(len(tokens) - REPEAT_NGRAM + 1)]
    style = (
        tokens[-1] == ".",
        len(tokens) <= MAX_LENGTH_RATIO * len(reference.split(" ")),
        len(set(ngrams)) == len(ngrams),
    )
    return float(form) * sum(style) / len(style)
