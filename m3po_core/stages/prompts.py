"""DAG step 1, prompts: the (image, instruction) table in shards, from the synthetic world or from
LLaVA-Instruct-format files (after the quality filter).

    prompts/shard-*.parquet, prompts/_stage.json     (the synthetic world also writes eval/ and images/)

The synthetic world is cached whole under its configuration; instruction files are read on every
run and only the shards whose rows changed (an edited record, an image replaced in place: each
prompt holds its image's SHA-256) are written again. Limit: the whole prompt list is built in memory
before it is cut into shards (150K prompts are ~100 MB of text; images are referenced, not held).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import fsspec
import pyarrow as pa
from PIL import Image

from m3po_core import schema
from m3po_core.config import RunConfig
from m3po_core.data.images import load_image, png
from m3po_core.errors import InputError
from m3po_core.stages.benchmarks import write_synthetic_benchmarks
from m3po_core.stages.runner import done_record, stage_key
from m3po_core.store import RunStore

log = logging.getLogger("m3po.prompts")
IMAGE_CACHE = "prompts/_images.parquet"  # image file identity -> SHA-256 and the filter's verdict


def prepare_prompts(cfg: RunConfig, store: RunStore) -> int:
    """Write the prompts table in shards; returns the number of shards.

    The synthetic world is cached whole under its configuration (its images are drawn from it).
    Instruction files are read again on every run: the key holds each file's content identity
    (`source_identity`), every prompt the SHA-256 of its image bytes (read once per file version,
    `m3po_core.data.image_digests`), and a shard is published again only when its rows changed, so
    an edited file or an image replaced in place recomputes exactly the shards that hold it, and
    the stages below them through their keys."""
    data = cfg.data
    marker = "prompts/_stage.json"
    if data.source == "synthetic":
        key = stage_key(cfg, "prompts")
        if (record := done_record(store, marker, key)) is not None:
            return record["n_shards"]
        rows, filtered, sources = _synthetic_prompts(cfg, store), None, None
    else:
        rows, filtered, sources = _file_prompts(cfg, store)
        key = stage_key(cfg, "prompts", sources)
    if data.max_prompts is not None and data.source == "synthetic":  # instruction files cut it while loading
        rows = rows[: data.max_prompts]
    validate_prompts(rows, f"prompts from {data.source}")
    if not rows:
        raise InputError(f"data source {data.source!r} produced no prompts"
                         + (f" (quality filter: {filtered})" if filtered else ""))
    n_shards, republished = 0, 0
    for n_shards, start in enumerate(range(0, len(rows), data.shard_size), start=1):
        chunk = rows[start: start + data.shard_size]
        table = pa.Table.from_pylist([{c: r.get(c) for c in schema.PROMPTS.names} for r in chunk], schema.PROMPTS)
        shard_key = key if sources is None else stage_key(cfg, "prompts", _rows_digest(table))
        if sources is None or not store.shard_done("prompts", n_shards - 1, shard_key):
            store.publish_shard("prompts", n_shards - 1, table, schema.PROMPTS, shard_key)
            republished += 1
    if sources is not None and republished:
        log.info("prompts: %d of %d shards written (new or changed rows)", republished, n_shards)
    store.write_json(marker, {"key": key, "n_shards": n_shards, "n_prompts": len(rows), "filter": filtered,
                              "sources": sources, "shards_written": republished})
    return n_shards


def _file_prompts(cfg: RunConfig, store: RunStore) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict]]:
    """LLaVA-Instruct-format prompts after the quality filter, each with its image's SHA-256."""
    from m3po_core.data.image_digests import digests
    from m3po_core.data.llava_instruct import load_llava_instruct
    from m3po_core.data.quality import quality_filter

    data = cfg.data
    if not data.path or data.image_root is None:
        raise InputError(f"data.source={data.source} needs data.path (the JSON file) and data.image_root")
    skipped: dict[str, int] = {}
    specs = [(data.path, data.image_root, data.max_prompts, data.turns, data.source)]
    specs += [(e.path, e.image_root, e.max_prompts, e.turns, e.source) for e in data.extra_sources]
    rows, sources = [], []
    for path, image_root, max_prompts, turns, source in specs:
        sources.append({"path": path, "identity": source_identity(path)})
        rows += load_llava_instruct(path, image_root, max_prompts=max_prompts, turns=turns, source=source,
                                    skipped=skipped)
    f = data.filter
    decode = f.enabled and f.check_images
    cached = store.read_table(IMAGE_CACHE) if store.exists(IMAGE_CACHE) else None
    facts, cache, n_read = digests(sorted({r["image"] for r in rows}), decode=decode, threads=f.image_threads,
                                   cache=cached)
    if cached is None or not cache.equals(cached):  # a re-run with nothing new writes nothing
        store.write_table(IMAGE_CACHE, cache)
    if n_read:
        log.info("prompts: read %d new or changed image files of %d", n_read, len(facts))
    rows, filtered = quality_filter(rows, f, facts)
    filtered["text_only_records"] = skipped.get("text_only", 0)
    filtered["images_read"] = n_read
    return rows, filtered, sources


def source_identity(url: str) -> str:
    """What identifies a source file's content: its SHA-256 on a local disk (a 150K-record JSON
    hashes in about a second), its version id or ETag on an object store (no download)."""
    from m3po_core.data.image_digests import store_version

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # an object store's listing cache would hide an edit
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{url}: file not found") from None
    if (version := store_version(info)) is not None:
        return version
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256={digest.hexdigest()}"


def _rows_digest(table: pa.Table) -> str:
    """The content of a shard's rows, independent of how Parquet lays them out."""
    return hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True).encode()).hexdigest()


def _synthetic_prompts(cfg: RunConfig, store: RunStore) -> list[dict[str, Any]]:
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    w = cfg.data.world
    bias = world.WorldBias.of(w)
    train = world.make_scenes(cfg.seed, "train", w.n_train_scenes, bias)
    rows = synthetic_prompts.make_prompts(train, cfg.seed, per_scene=w.prompts_per_scene, bias=bias, open_per_scene=w.open_per_scene,
                                          explain=w.explain)
    digest = {}
    for s in train:
        data = png(world.render(s, w.image_size))
        store.write_bytes(f"images/{s.scene_id}.png", data)
        digest[s.scene_id] = hashlib.sha256(data).hexdigest()
    for r in rows:
        r["image"] = store.url(f"images/{r['scene_id']}.png")
        r["image_sha256"] = digest[r["scene_id"]]
        r["source"] = "synthetic"
    write_synthetic_benchmarks(cfg, store, train)
    return rows


def validate_prompts(rows: list[dict[str, Any]], where: str) -> None:
    """Unique prompt ids, an instruction and an image reference in every row; errors name the row."""
    first_row: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.get("prompt_id") in first_row:
            raise InputError(f"{where} row {i}: prompt_id {r['prompt_id']!r} repeats row {first_row[r['prompt_id']]}")
        first_row[r.get("prompt_id")] = i
        if not (r.get("instruction") or "").strip():
            raise InputError(f"{where} row {i} (prompt_id {r.get('prompt_id')!r}): empty instruction")
        if not r.get("image"):
            raise InputError(f"{where} row {i} (prompt_id {r.get('prompt_id')!r}): no image reference")


def read_prompts_shard(store: RunStore, shard: int) -> list[dict[str, Any]]:
    return store.read_shard("prompts", shard).to_pylist()


def load_shard_images(rows: list[dict[str, Any]], shard: int) -> list[Image.Image]:
    return [load_image(r["image"], f"prompts shard {shard} row {i}, prompt_id {r['prompt_id']!r}",
                       sha256=r.get("image_sha256")) for i, r in enumerate(rows)]
