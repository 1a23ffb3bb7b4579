"""The quality filter applied to instruction data before sampling (LLaVA-Instruct, ShareGPT4V).

Rules, in this order; a prompt dropped by one is counted under that reason only:

1. `instruction_length`: the instruction has between `min_instruction_words` and
   `max_instruction_words` whitespace-separated words (too short says nothing to align; too long
   crowds the image out of the context).
2. `image_unreadable`: with `check_images` on, every image is read and decoded by Pillow
   (`Image.load()`, which reads the pixels; a truncated JPEG fails here); a missing file counts
   too. Any other read failure (credentials, network) stops the stage naming the image. Reading is
   threaded (`image_threads`), as images usually sit on object storage, and done once per file
   version (`m3po_core.data.image_digests`).
2b. `image_too_large`: an image over `m3po_core.data.images.MAX_IMAGE_PIXELS` pixels (checked
   before decoding: a decompression bomb); the first few prompt ids are logged and kept in the stats.
3. `duplicate`: the same image and the same instruction (lower-cased, whitespace collapsed) as an
   earlier prompt; the first is kept. "Same image" means the same bytes (SHA-256) where the digests are
   known (always in the prompts stage, which reads every image), else the same path.

Dropping is not an error: the counts (and the first few dropped prompt ids per reason) go into the
prompts stage record and the report, so a source that loses much is visible.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from m3po_core.data.image_digests import MISSING, READABLE, TOO_LARGE, UNDECODABLE, digests
from m3po_core.data.images import MAX_IMAGE_PIXELS

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


def quality_filter(rows: list[dict[str, Any]], cfg: QualityFilterConfig,
                   images: dict[str, tuple[str | None, str]] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The prompts that pass, in their order, and what was dropped: {reason: count}, examples.
    `images` is url -> (sha256, verdict) from `m3po_core.data.image_digests.digests` (decoded when
    `check_images` is on; read here when not given); each row kept gets its `image_sha256`."""
    stats: dict[str, Any] = {"input": len(rows), "instruction_length": 0, "duplicate": 0, "image_unreadable": 0,
                             "image_too_large": 0, "examples": {}}
    if images is None and cfg.enabled and cfg.check_images:
        images = digests(sorted({r["image"] for r in rows}), decode=True, threads=cfg.image_threads, cache=None)[0]
    images = images or {}
    if not cfg.enabled:
        for r in rows:
            r["image_sha256"] = images.get(r["image"], (None, ""))[0]
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
    image_key: dict[str, str | None] = {}
    for r in sized:
        digest, verdict = images.get(r["image"], (None, READABLE))
        r["image_sha256"] = digest
        if not cfg.check_images:  # nothing is dropped for its image; duplicates by bytes where known
            verdict = READABLE
        image_key[r["image"]] = (TOO_LARGE if verdict == TOO_LARGE else None if verdict in (MISSING, UNDECODABLE)
                                 else digest or r["image"])
    kept, seen = [], set()
    for r in sized:
        if image_key[r["image"]] in (None, TOO_LARGE):
            drop("image_unreadable" if image_key[r["image"]] is None else "image_too_large", r)
            continue
        key = (image_key[r["image"]], " ".join(r["instruction"].lower().split()))
        if cfg.dedupe and key in seen:
            drop("duplicate", r)
            continue
        seen.add(key)
        kept.append(r)
    stats["kept"] = len(kept)
    if len(kept) < len(rows):
        log.info("quality filter: kept %d of %d prompts (instruction length %d, duplicates %d, unreadable images %d, "
                 "images over %s pixels %d: %s)", len(kept), len(rows), stats["instruction_length"], stats["duplicate"],
                 stats["image_unreadable"], f"{MAX_IMAGE_PIXELS:,}", stats["image_too_large"],
                 stats["examples"].get("image_too_large", []))
    return kept, stats
