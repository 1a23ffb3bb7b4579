"""IFT: an instruction-following test with checkable constraints.

The paper reports an "instruction-following test" but does not publish it. This one follows
IFEval's idea (Zhou et al. 2023: verifiable instructions, scored per constraint and per prompt)
for images: each question is a visual task plus constraints on format, length and content, and
each constraint is checked on its own.

Question record (the Parquet layout `evaluation.ift_path` reads, and what the synthetic world and
`m3po make-ift` write): `question_id`, `question` (the full instruction as the model sees it),
`image`, `category` (the visual task), `constraints` (a JSON list, below), `answer` (a reference
answer, may be empty).

Constraints, `{"type": ..., args}`. Rule-checked (deterministic, case-insensitive, "words" are
runs of letters, digits and apostrophes):

    max_words n / min_words n        length in words
    max_sentences n                  sentences = non-empty pieces between . ! ? and line ends
    yes_no_first                     the first word is "yes" or "no"
    include_any options              at least one option occurs as whole words
    include_all words                every word occurs (whole words)
    exclude words                    none occurs (whole words)
    numbered_list n                  exactly n lines "1. ...", "2) ..."
    bullet_list n                    exactly n lines starting "- ", "* " or "• "
    json_object keys                 the reply (``` fences allowed) parses as a JSON object with these keys
    lowercase                        letters present, none upper-case
    ends_with phrase                 the reply ends with the phrase (final punctuation and spaces ignored)

Judge-checked (content, which no rule can decide):

    judge aspect min                 the run's judge rates the reply on `aspect` (accuracy, relevance
                                     or adherence, in [0, 1]) at least `min`

A reply the judge could not rate leaves its judge constraints unverified: they are counted in
`unrated` and left out of the accuracies (never counted as passed or failed), and so is the
question at prompt level.

Metrics: `prompt_accuracy` (all constraints of a question hold: IFEval's strict prompt-level
accuracy), `constraint_accuracy` (over all constraints), `rule_prompt_accuracy` (rule constraints
only, no judge needed), `by_type` and `by_category`.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from m3po_core.errors import InputError

JUDGE_ASPECTS = ("accuracy", "relevance", "adherence")
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_SENTENCE = re.compile(r"[.!?]+(?:\s|$)|\n")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S")
_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _has_phrase(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words (case-insensitive, any spacing between words)."""
    words, target = _words(text), _words(phrase)
    return bool(target) and any(words[i: i + len(target)] == target for i in range(len(words) - len(target) + 1))


def _json_object(text: str, keys: Sequence[str]) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return False
    return isinstance(value, dict) and all(k in value for k in keys)


# type -> (required args, check(reply, args) -> bool)
RULES: dict[str, tuple[tuple[str, ...], Callable[[str, Mapping[str, Any]], bool]]] = {
    "max_words": (("n",), lambda r, a: len(_words(r)) <= a["n"]),
    "min_words": (("n",), lambda r, a: len(_words(r)) >= a["n"]),
    "max_sentences": (("n",), lambda r, a: 0 < len([s for s in _SENTENCE.split(r) if _words(s)]) <= a["n"]),
    "yes_no_first": ((), lambda r, a: _words(r)[:1] in (["yes"], ["no"])),
    "include_any": (("options",), lambda r, a: any(_has_phrase(r, o) for o in a["options"])),
    "include_all": (("words",), lambda r, a: all(_has_phrase(r, w) for w in a["words"])),
    "exclude": (("words",), lambda r, a: not any(_has_phrase(r, w) for w in a["words"])),
    "numbered_list": (("n",), lambda r, a: sum(bool(_NUMBERED.match(l)) for l in r.splitlines()) == a["n"]),
    "bullet_list": (("n",), lambda r, a: sum(bool(_BULLET.match(l)) for l in r.splitlines()) == a["n"]),
    "json_object": (("keys",), lambda r, a: _json_object(r, a["keys"])),
    "lowercase": ((), lambda r, a: any(c.isalpha() for c in r) and r == r.lower()),
    "ends_with": (("phrase",), lambda r, a: re.sub(r"[\s.!?'\"]+$", "", r).lower().endswith(
        re.sub(r"[\s.!?'\"]+$", "", a["phrase"].strip()).lower())),
}


def parse_constraints(value: Any, where: str) -> list[dict[str, Any]]:
    """A question's constraints from JSON text or a list, checked: InputError names `where` and the
    constraint at fault."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InputError(f"{where}: 'constraints' is not valid JSON ({e})") from None
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'constraints' must be a non-empty JSON list")
    out = []
    for j, c in enumerate(value):
        if not isinstance(c, dict) or "type" not in c:
            raise InputError(f"{where}: constraint {j} has no 'type'")
        kind = c["type"]
        if kind == "judge":
            if c.get("aspect") not in JUDGE_ASPECTS or not isinstance(c.get("min"), (int, float)):
                raise InputError(f"{where}: constraint {j} (judge) needs 'aspect' in {JUDGE_ASPECTS} and a numeric 'min'")
        elif kind not in RULES:
            raise InputError(f"{where}: constraint {j} has unknown type {kind!r}; known: {sorted(RULES) + ['judge']}")
        else:
            missing = [a for a in RULES[kind][0] if a not in c]
            if missing:
                raise InputError(f"{where}: constraint {j} ({kind}) lacks {missing}")
        out.append(dict(c))
    return out


def needs_judge(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(c["type"] == "judge" for r in records for c in parse_constraints(r["constraints"], "question"))


def check(reply: str, constraint: Mapping[str, Any], rating: Any = None) -> bool | None:
    """One constraint on one reply; None when it is a judge constraint and the reply is unrated."""
    if constraint["type"] == "judge":
        return None if rating is None else getattr(rating, constraint["aspect"]) >= constraint["min"]
    return bool(RULES[constraint["type"]][1](reply or "", constraint))


def score(records: Sequence[Mapping[str, Any]], ratings: Sequence[Any] | None = None) -> dict[str, Any]:
    """IFT metrics. Each record has `question_id`, `category`, `constraints` and `prediction`;
    `ratings[i]` is the judge's JudgeScore of `records[i]`'s prediction (or None), needed only
    for judge constraints."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    per_category: dict[str, list[bool]] = defaultdict(list)
    prompt_ok: list[bool] = []
    rule_prompt_ok: list[bool] = []
    unrated = 0
    for i, r in enumerate(records):
        constraints = parse_constraints(r["constraints"], f"question {r.get('question_id')!r}")
        rating = ratings[i] if ratings is not None else None
        results = [check(r.get("prediction") or "", c, rating) for c in constraints]
        for c, ok in zip(constraints, results):
            if ok is not None:
                per_type[c["type"] if c["type"] != "judge" else f"judge_{c['aspect']}"].append(ok)
        rule_results = [ok for c, ok in zip(constraints, results) if c["type"] != "judge"]
        if rule_results:
            rule_prompt_ok.append(all(rule_results))
        if any(ok is None for ok in results):
            unrated += 1
            continue
        prompt_ok.append(all(results))
        per_category[r.get("category") or ""].append(all(results))
    everything = [ok for oks in per_type.values() for ok in oks]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"n": len(records), "unrated": unrated,
            "prompt_accuracy": mean(prompt_ok), "constraint_accuracy": mean(everything),
            "rule_prompt_accuracy": mean(rule_prompt_ok),
            "by_type": {k: mean(v) for k, v in sorted(per_type.items())},
            "by_category": {k: mean(v) for k, v in sorted(per_category.items())}}


# ------------------------------------------------------------------ question sets

JUDGE_CONTENT = {"type": "judge", "aspect": "accuracy", "min": 0.5}


def synthetic_constraints(kind: str, params: Mapping[str, Any], explained: bool = False) -> list[dict[str, Any]]:
    """The synthetic world's IFT: its model reads only the world's closed vocabulary, so constraints
    cannot be added as new phrases. Instead each instruction's own wording is made checkable: a
    yes/no question must be answered yes/no first, "how many" with a number, "what colour" with a
    colour, "where" with a position, "briefly" in one sentence of at most 24 words, every answer
    short (the open kinds: one sentence, "where are" with a position, "in detail" with the count);
    and its content must be right (the judge). In a world whose yes/no answers explain themselves
    (`explained`, data.world.explain) a yes/no answer is two sentences of at most 48 words."""
    from m3po_core.data import synthetic as world

    if kind in world.YES_NO_KINDS and explained:
        rules = [{"type": "yes_no_first"}, {"type": "max_sentences", "n": 2}, {"type": "max_words", "n": 48}]
    elif kind in world.YES_NO_KINDS:
        rules = [{"type": "yes_no_first"}, {"type": "max_words", "n": 12}]
    elif kind == "count":
        rules = [{"type": "include_any", "options": list(world.NUMBER_WORDS[1:])}, {"type": "max_words", "n": 8}]
    elif kind == "colour":
        rules = [{"type": "include_any", "options": list(world.COLOURS)},
                 {"type": "include_all", "words": [params["shape"]]}, {"type": "max_words", "n": 8}]
    elif kind == "position":
        rules = [{"type": "include_any", "options": list(world.POSITIONS)}, {"type": "max_words", "n": 12}]
    elif kind == "describe":
        rules = [{"type": "max_sentences", "n": 1}, {"type": "max_words", "n": 24}]
    elif kind == "list":  # open kinds: one sentence naming at most four objects (with their places)
        rules = [{"type": "max_sentences", "n": 1}, {"type": "max_words", "n": 24}]
    elif kind == "locate":
        rules = [{"type": "include_any", "options": list(world.POSITIONS)}, {"type": "max_sentences", "n": 1},
                 {"type": "max_words", "n": 48}]
    elif kind == "describe_detail":
        rules = [{"type": "include_any", "options": list(world.NUMBER_WORDS[1:])}, {"type": "max_sentences", "n": 1},
                 {"type": "max_words", "n": 48}]
    else:
        raise ValueError(f"unknown instruction kind {kind!r}")
    return rules + [dict(JUDGE_CONTENT)]


# Visual tasks and constraint templates for real images (`make_questions`). Each template:
# (name, group, instruction sentence, constraint). Two constraints of one group never go together.
TASKS = {
    "describe": "Describe this image.",
    "objects": "What objects can you see in this image?",
    "scene": "Where might this photo have been taken, and why?",
    "activity": "What is happening in this image?",
}
TEMPLATES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("max_words_25", "length", "Answer in at most 25 words.", {"type": "max_words", "n": 25}),
    ("max_words_50", "length", "Use no more than 50 words.", {"type": "max_words", "n": 50}),
    ("min_words_40", "length", "Answer in at least 40 words.", {"type": "min_words", "n": 40}),
    ("one_sentence", "length", "Answer in exactly one sentence.", {"type": "max_sentences", "n": 1}),
    ("numbered_3", "format", "Format your answer as a numbered list of exactly 3 items.",
     {"type": "numbered_list", "n": 3}),
    ("bullets_2", "format", "Give exactly 2 bullet points, each starting with '- '.", {"type": "bullet_list", "n": 2}),
    ("json", "format", 'Reply with only a JSON object with the keys "objects" and "summary".',
     {"type": "json_object", "keys": ["objects", "summary"]}),
    ("no_image_word", "words", "Do not use the words 'image' or 'picture'.",
     {"type": "exclude", "words": ["image", "picture"]}),
    ("say_visible", "words", "Use the word 'visible' at least once.", {"type": "include_all", "words": ["visible"]}),
    ("lowercase", "style", "Write everything in lowercase letters.", {"type": "lowercase"}),
    ("ends_with", "style", "End your reply with the words 'that is all'.", {"type": "ends_with", "phrase": "that is all"}),
)
# Pairs that cannot both be met (a one-sentence list, a sentence appended after JSON, ...).
CONFLICTS = {frozenset(p) for p in (("one_sentence", "numbered_3"), ("one_sentence", "bullets_2"),
                                     ("one_sentence", "json"), ("min_words_40", "json"), ("json", "ends_with"),
                                     ("max_words_25", "json"))}


def make_questions(images: Sequence[str], seed: int = 0, per_image: int = 1,
                   constraints_per_question: int = 2) -> list[dict[str, Any]]:
    """IFT questions for any images (e.g. COCO val2014, as POPE uses): per image, `per_image`
    questions, each a visual task with `constraints_per_question` compatible constraint templates
    and the judge's content check. Deterministic from `seed` and the image names."""
    rows = []
    for image in images:
        rng = random.Random(f"{seed}:ift:{image}")
        for j, task in enumerate(rng.sample(sorted(TASKS), min(per_image, len(TASKS)))):
            chosen: list[tuple[str, str, str, dict[str, Any]]] = []
            for t in rng.sample(TEMPLATES, len(TEMPLATES)):
                if len(chosen) == constraints_per_question:
                    break
                if all(t[1] != c[1] and frozenset((t[0], c[0])) not in CONFLICTS for c in chosen):
                    chosen.append(t)
            tag = hashlib.sha1(image.encode()).hexdigest()[:8]  # same file name in two folders: two ids
            rows.append({"question_id": f"{image.rsplit('/', 1)[-1]}-{tag}-{j}", "image": image, "category": task,
                         "question": " ".join([TASKS[task]] + [c[2] for c in chosen]),
                         "constraints": json.dumps([c[3] for c in chosen] + [dict(JUDGE_CONTENT)]),
                         "answer": ""})
    return rows


def write_question_file(images_spec: str, out: str, seed: int = 0, per_image: int = 1,
                        constraints_per_question: int = 2) -> tuple[int, int]:
    """`m3po make-ift`: questions (`make_questions`) for the images `images_spec` names (a directory,
    a glob, or a .txt list of paths or URLs; local or an fsspec URL), written as one Parquet file
    `out` in one write. (questions, images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    from m3po_core.errors import InputError

    fs, path = url_to_fs(images_spec)
    image_ext = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [f for f in fs.find(path) if f.lower().endswith(image_ext)]
    elif fs.exists(path) and path.endswith(".txt"):
        found = [line.strip() for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    else:
        raise InputError(f"--images {images_spec}: no such directory, glob or .txt list")
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    images = sorted(f if "://" in f or local else fs.unstrip_protocol(f) for f in found)
    if not images:
        raise InputError(f"--images {images_spec}: no images found")
    rows = make_questions(images, seed=seed, per_image=per_image, constraints_per_question=constraints_per_question)
    buffer = pa.BufferOutputStream()  # the whole file first: a failure to build it leaves no file behind
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    out_fs, out_path = url_to_fs(out)
    try:
        out_fs.pipe_file(out_path, buffer.getvalue().to_pybytes())
    except OSError as e:  # a missing folder, no permission, a full disk
        raise InputError(f"--out {out}: cannot write it ({type(e).__name__}: {e})") from None
    return len(rows), len(images)
