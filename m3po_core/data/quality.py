"""The quality filter applied to instruction data before sampling (LLaVA-Instruct, ShareGPT4V).

Rules, in this order; a prompt dropped by one is counted under that reason only:

1. `instruction_length`: the instruction has between `min_instruction_words` and
   `max_instruction_words` whitespace-separated words (too short says nothing to align; too long
   crowds the image out of the context).
2. `image_unreadable`: with `check_images` on, every image is read and decoded by Pillow
   (`Image.load()`, which reads the pixels; a truncated JPEG fails here); a missing file counts
   too. Any other read failure (credentials, network) stops the stage naming the image. Reading is
   threaded (`image_threads`), as images usually sit on object storage.
3. `duplicate`: the same image and the same instruction (lower-cased, whitespace collapsed) as an
   earlier prompt; the first is kept. "Same image" means the same bytes (SHA-256) when images are
   read (rule 2 on), else the same path.

Dropping is not an error: the counts (and the first few dropped prompt ids per reason) go into the
prompts stage record and the report, so a source that loses much is visible.
"""
from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
from PIL import Image

from m3po_core.errors import InputError

log = logging.getLogger("m3po.quality")
EXAMPLES = 5  # dropped prompt ids kept per reason


@dataclass
class QualityFilterConfig:
    """The quality filter on instruction data (`data.filter`): instruction length, unreadable images, duplicates."""

    enabled: bool = field(default=True, metadata={"help": "Off: every prompt is kept, no rule runs."})
    min_instruction_words: int = field(default=2, metadata={
        "help": "Rule instruction_length: fewer whitespace-separated words drop the prompt (too short says "
                "nothing to align)."})
    max_instruction_words: int = field(default=300, metadata={
        "help": "Rule instruction_length: more words drop the prompt (too long crowds the image out of the "
                "context)."})
    dedupe: bool = field(default=True, metadata={
        "help": "Rule duplicate: drop a prompt with the same image and the same instruction (lower-cased, "
                "whitespace collapsed) as an earlier one; same image = same bytes with check_images, else "
                "same path."})
    check_images: bool = field(default=True, metadata={
        "help": "Rule image_unreadable: read and decode every image with Pillow; a missing or undecodable one "
                "drops its prompts, any other read failure stops the stage naming the image."})
    image_threads: int = field(default=16, metadata={
        "help": "Threads that read the images (check_images), as they usually sit on object storage."})


def _image_digest(url: str) -> str | None:
    """SHA-256 of the image's bytes if Pillow decodes it; None if the file is missing or does not
    decode. Any other failure (credentials, throttling, a network error) is raised, naming the
    image: dropping those prompts would cache a silently smaller data set."""
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except Exception as e:
        raise InputError(f"{url}: cannot read the image ({type(e).__name__}: {e}); nothing was filtered") from e
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:  # Pillow raises several types for corrupt or truncated data
        return None
    return hashlib.sha256(data).hexdigest()


def quality_filter(rows: list[dict[str, Any]], cfg: QualityFilterConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The prompts that pass, in their order, and what was dropped: {reason: count}, examples."""
    stats: dict[str, Any] = {"input": len(rows), "instruction_length": 0, "duplicate": 0, "image_unreadable": 0,
                             "examples": {}}
    if not cfg.enabled:
        stats["kept"] = len(rows)
        return rows, stats

    def drop(reason: str, row: dict[str, Any]) -> None:
        stats[reason] += 1
        examples = stats["examples"].setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(row["prompt_id"])

    sized = []
    for r in rows:
        n = len(r["instruction"].split())
        if cfg.min_instruction_words <= n <= cfg.max_instruction_words:
            sized.append(r)
        else:
            drop("instruction_length", r)
    image_key: dict[str, str | None] = {r["image"]: r["image"] for r in sized}
    if cfg.check_images:
        urls = sorted(image_key)
        every = max(1000, len(urls) // 20)  # progress on long checks (150K images take minutes)
        with ThreadPoolExecutor(max_workers=max(1, cfg.image_threads)) as pool:
            for done, (url, digest) in enumerate(zip(urls, pool.map(_image_digest, urls)), start=1):
                image_key[url] = digest
                if done % every == 0 and done < len(urls):
                    log.info("quality filter: read and decoded %d of %d images", done, len(urls))
    kept, seen = [], set()
    for r in sized:
        if image_key[r["image"]] is None:
            drop("image_unreadable", r)
            continue
        key = (image_key[r["image"]], " ".join(r["instruction"].lower().split()))
        if cfg.dedupe and key in seen:
            drop("duplicate", r)
            continue
        seen.add(key)
        kept.append(r)
    stats["kept"] = len(kept)
    if len(kept) < len(rows):
        log.info("quality filter: kept %d of %d prompts (instruction length %d, duplicates %d, unreadable images %d)",
                 len(kept), len(rows), stats["instruction_length"], stats["duplicate"], stats["image_unreadable"])
    return kept, stats
