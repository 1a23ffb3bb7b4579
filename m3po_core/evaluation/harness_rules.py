"""How each public evaluation harness reads a yes/no reply, by name, so that this project's POPE and
MME numbers can stand beside published ones computed by that harness.

    rule         POPE reading                                  MME reading
    default      this project's (yesno.parse_yes_no)           the same
    lmms-eval    reply.lower().strip() == "yes"/"no" exactly   MME tool's, plus dots removed and "y"/"n"
    vlmevalkit   VQA punctuation removed, split into words;    the same
                 "yes" without "no" -> yes, "no" without
                 "yes" -> no, else Unknown (rule only, no judge)
    llava        text before the first ".", commas dropped,    the MME tool's (exact "yes"/"no", else
                 split on " "; "No"/"no"/"not" -> no, else yes "yes", then "no", in the first 4 chars)

Sources read (behaviour reproduced, not copied): lmms-eval `lmms_eval/tasks/pope/utils.py` and
`lmms_eval/tasks/mme/utils.py`; VLMEvalKit `vlmeval/dataset/utils/yorn.py` (YOrN_Extraction) with
`vlmeval/smp/misc.py` (process_punctuation); LLaVA `llava/eval/eval_pope.py`; LLaVA's MME run goes
through the MME release's `eval_tool/calculation.py`.

What differs besides reading, and where it is applied (pope.py, mme.py):
- lmms-eval POPE counts a false negative only for a reply that reads exactly "no" (any other reply to
  a "yes" question is outside recall) and its `yes_ratio` is the share of *gold* "yes" answers; every
  other rule's `yes_ratio` is the share of replies read as "yes" (VLMEvalKit reports none).
- lmms-eval MME adds every subtask outside the ten perception ones to cognition.
- VLMEvalKit POPE splits a comma-joined category ("random,popular") and counts the question in each
  split and once per split in the overall figures.
Limit: LLaVA's and the MME tool's scripts read predictions from line-based files; a reply with a
newline or tab breaks those files there, here it is read whole.
"""
from __future__ import annotations

import re

from m3po_core.evaluation.yesno import NO, UNKNOWN, YES, parse_yes_no

RULES = ("default", "lmms-eval", "vlmevalkit", "llava")
YES_RATIO_MEANS = {"default": "predicted", "lmms-eval": "gold", "vlmevalkit": "predicted", "llava": "predicted"}

# The VQA tool's punctuation list, as VLMEvalKit's process_punctuation uses it.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The original pattern, "(?!<=\d)(\.)(?!\d)", opens with a lookahead that never fails before a ".":
# it removes every "." not followed by a digit. It passes re.UNICODE (32) where `count` goes.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; one of {', '.join(RULES)}")
    return rule


def read_pope(reply: str, rule: str = "default") -> str:
    """A POPE reply read as `rule` reads it: "yes", "no" or "unknown"."""
    if check_rule(rule) == "lmms-eval":
        text = reply.lower().strip()
        return text if text in (YES, NO) else UNKNOWN
    if rule == "llava":
        return _llava_pope(reply)
    return _read_common(reply, rule)


def read_mme(reply: str, rule: str = "default") -> str:
    """An MME reply read as `rule` reads it: "yes", "no" or "unknown"."""
    if check_rule(rule) == "lmms-eval":
        text = reply.lower().strip().replace(".", "")
        if len(text) == 1:
            return {"y": YES, "n": NO}.get(text, UNKNOWN)
        return _mme_tool(text)
    if rule == "llava":
        return _mme_tool(reply.lower())
    return _read_common(reply, rule)


def _read_common(reply: str, rule: str) -> str:
    if rule == "default":
        return parse_yes_no(reply)
    words = _vqa_punctuation(reply.lower()).split()
    if YES in words and NO not in words:
        return YES
    if NO in words and YES not in words:
        return NO
    return UNKNOWN


def _vqa_punctuation(text: str) -> str:
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCT:  # tested against the original text, applied to the running one, as the tool does
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _llava_pope(reply: str) -> str:
    first = reply.split(".")[0]  # also the whole reply when it has no "."
    words = first.replace(",", "").split(" ")
    return NO if any(w in ("No", "no", "not") for w in words) else YES


def _mme_tool(text: str) -> str:
    """The MME release's reading of a lowercased reply."""
    if text in (YES, NO):
        return text
    head = text[:4]
    return YES if YES in head else NO if NO in head else UNKNOWN
