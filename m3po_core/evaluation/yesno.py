"""Reading yes/no answers out of free-form model replies, shared by POPE and MME."""

import re
from collections.abc import Iterable, Mapping, Sequence

from m3po_core.errors import InputError

YES, NO, UNKNOWN = "yes", "no", "unknown"

_SENTENCE_END = re.compile(r"[.!?\n]")
# Letters only, with an optional apostrophe suffix so "isn't" stays one word.
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = {"no", "not"}


def parse_yes_no(text: str) -> str:
    """Map a model reply to "yes", "no" or "unknown".

    Rule (comparable with LLaVA's POPE script and VLMEvalKit's yes/no matching):

    1. Lowercase the reply (curly apostrophes count as ``'``).
    2. Keep the first sentence: the text before the first ``.``, ``!``, ``?`` or
       newline that ends a non-empty sentence (leading punctuation is skipped).
    3. Split it into words made of letters, keeping ``n't`` contractions whole,
       so "yes," gives "yes" and "isn't" stays "isn't".
    4. If a word is "no", "not" or ends in "n't" -> "no"; elif a word is "yes"
       -> "yes"; else "unknown".

    Negation wins, so "yes, there is no doubt" is "no" and "NOT sure" is "no",
    as in LLaVA's script. Unlike LLaVA (which reads anything without a negation
    as "yes"), a reply with neither word is "unknown". lmms-eval instead
    compares the whole stripped, lowercased reply with "yes"/"no" exactly, so
    there "Yes." or "Yes, there is a dog." count as wrong; here they are "yes".
    """
    lowered = text.lower().replace("\u2019", "'")
    sentence = next(
        (part for part in _SENTENCE_END.split(lowered) if part.strip()), ""
    )
    words = _WORD.findall(sentence)
    if any(word in _NEGATIONS or word.endswith("n't") for word in words):
        return NO
    if YES in words:
        return YES
    return UNKNOWN


def check_records(
    records: Iterable[Mapping], fields: Sequence[str]
) -> list[Mapping]:
    """Return the records as a list, raising InputError if one lacks a field
    or has an answer other than yes/no (any case)."""
    checked = list(records)
    if not checked:
        raise InputError("no records to score")
    for index, record in enumerate(checked):
        for field in fields:
            if field not in record:
                raise InputError(f"record {index}: missing field {field!r}")
        if not isinstance(record["prediction"], str):
            raise InputError(f"record {index}: field 'prediction' is not text")
        if str(record["answer"]).strip().lower() not in (YES, NO):
            raise InputError(
                f"record {index}: field 'answer' is {record['answer']!r}, "
                "expected 'yes' or 'no'"
            )
    return checked


def true_answer(record: Mapping) -> str:
    """The record's reference answer as "yes" or "no" (already checked)."""
    return str(record["answer"]).strip().lower()
