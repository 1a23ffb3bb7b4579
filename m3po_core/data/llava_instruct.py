"""Prompts from LLaVA-Instruct-150K's JSON format (e.g. ``llava_instruct_150k.json``), which
ShareGPT4V's files share (``sharegpt4v_instruct_gpt4-vision_cap100k.json``, ``share-captioner_coco_lcs_sam_1246k_1107.json``).

The file is a JSON list of records ``{"id", "image", "conversations": [{"from":
"human"|"gpt", "value": ...}, ...]}``. Rule: each human turn followed by a gpt
turn becomes one single-turn prompt (instruction = the human text, reference =
the gpt answer); a human turn with no gpt answer is dropped. ``turns="first"``
keeps the first pair of each conversation, ``turns="all"`` keeps every pair.
prompt_id is f"{id}-t{k}" (k = the pair's index) in both modes, so a prompt keeps
its id whichever mode loaded it. The ``<image>`` placeholder and the whitespace
around it are removed from the instruction: the pipeline adds the model's own.
Paths may be local or any fsspec URL (``s3://...``); an image reference must stay inside its
image root (``m3po_core.data.images.resolve_image_ref``).

ShareGPT4V (``source="sharegpt4v"``): the same records; its image paths are relative to the data
root (``coco/train2017/...``, ``sam/images/...``), and its mixes hold text-only records (no
``image``), which are skipped and counted. Its prompt ids are prefixed ``sharegpt4v-``: both sets
describe COCO images under the same ids, and a run may load both (``data.extra_sources``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import fsspec

from m3po_core.data.images import resolve_image_ref
from m3po_core.errors import ConfigError, InputError

SOURCE = "llava_instruct"
SOURCES = ("llava_instruct", "sharegpt4v")
TURN_MODES = ("first", "all")
_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")


def load_llava_instruct(
    json_path: str,
    image_root: str,
    *,
    max_prompts: int | None = None,
    turns: str = "first",
    source: str = SOURCE,
    skipped: dict | None = None,
) -> list[dict]:
    """Single-turn prompts in file order, at most ``max_prompts`` of them. ``skipped`` (if given)
    counts the text-only records left out (ShareGPT4V)."""
    if turns not in TURN_MODES:
        raise ConfigError(f"turns: expected one of {TURN_MODES}, got {turns!r}")
    if source not in SOURCES:
        raise ConfigError(f"source: expected one of {SOURCES}, got {source!r}")
    records = _read_records(json_path)
    prefix = "" if source == SOURCE else f"{source}-"
    prompts: list[dict] = []
    for index, record in enumerate(records):
        if source == "sharegpt4v" and isinstance(record, dict) and not record.get("image"):
            if skipped is not None:
                skipped["text_only"] = skipped.get("text_only", 0) + 1
            continue
        for k, (instruction, reference) in enumerate(_pairs(json_path, index, record)):
            if max_prompts is not None and len(prompts) >= max_prompts:
                return prompts
            prompts.append(
                {
                    "prompt_id": f"{prefix}{record['id']}-t{k}",
                    "image": resolve_image_ref(image_root, record["image"],
                                               f"{json_path}: record {index} (id {record['id']!r})"),
                    "instruction": instruction,
                    "reference": reference,
                    "source": source,
                    "kind": "open",
                    "scene": None,
                }
            )
            if turns == "first":
                break
    return prompts


def check_images(prompts: list[dict]) -> None:
    """Raise InputError naming the first prompt whose image file does not exist."""
    for prompt in prompts:
        fs, path = fsspec.core.url_to_fs(prompt["image"])
        if not fs.exists(path):
            raise InputError(
                f"image not found: {prompt['image']} (prompt {prompt['prompt_id']})"
            )


def _read_records(json_path: str) -> list:
    fs, path = fsspec.core.url_to_fs(json_path)
    if not fs.exists(path):
        raise InputError(f"{json_path}: file not found")
    with fs.open(path, "rb") as file:
        try:
            records = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{json_path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        kind = type(records).__name__
        raise InputError(f"{json_path}: expected a JSON list of records, got a {kind}")
    return records


def _pairs(json_path: str, index: int, record: object) -> Iterator[tuple[str, str]]:
    """(instruction, reference) for each human turn answered by a gpt turn."""
    where = f"{json_path}: record {index}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object")
    for key in ("id", "image", "conversations"):
        if key not in record:
            raise InputError(f"{where} (id {record.get('id')!r}): missing field {key!r}")
    where = f"{where} (id {record['id']!r})"
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: field 'conversations' must be a non-empty list")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise InputError(f"{where}: conversations[{j}] needs 'from' and 'value'")
    if turns[0]["from"] != "human":
        speaker = turns[0]["from"]
        raise InputError(f"{where}: conversations[0] must be a human turn, got {speaker!r}")
    for j, (asked, answered) in enumerate(zip(turns, turns[1:])):
        if asked["from"] != "human" or answered["from"] != "gpt":
            continue
        instruction = _IMAGE_PLACEHOLDER.sub(" ", str(asked["value"])).strip()
        if not instruction:
            raise InputError(f"{where}: conversations[{j}].value is empty without <image>")
        yield instruction, str(answered["value"]).strip()

