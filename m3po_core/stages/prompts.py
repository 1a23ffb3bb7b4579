"""DAG step 1, prompts: the (image, instruction) table in shards, from the synthetic world or from
LLaVA-Instruct-format files (after the quality filter).

    prompts/shard-*.parquet, prompts/_stage.json     (the synthetic world also writes eval/ and images/)

Cached as a whole under its configuration. Limit: the whole prompt list is built in memory before
it is cut into shards (150K prompts are ~100 MB of text; images are referenced, not held).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
from PIL import Image

from m3po_core import schema
from m3po_core.config import RunConfig
from m3po_core.data.images import load_image, png
from m3po_core.errors import InputError
from m3po_core.stages.benchmarks import write_synthetic_benchmarks
from m3po_core.stages.runner import done_record, stage_key
from m3po_core.store import RunStore


def prepare_prompts(cfg: RunConfig, store: RunStore) -> int:
    """Write the prompts table in shards; returns the number of shards. Cached as a whole."""
    key = stage_key(cfg, "prompts")
    marker = "prompts/_stage.json"
    if (record := done_record(store, marker, key)) is not None:
        return record["n_shards"]

    data = cfg.data
    filtered: dict[str, Any] | None = None
    if data.source == "synthetic":
        rows = _synthetic_prompts(cfg, store)
    else:
        from m3po_core.data.llava_instruct import load_llava_instruct
        from m3po_core.data.quality import quality_filter

        if not data.path or data.image_root is None:
            raise InputError(f"data.source={data.source} needs data.path (the JSON file) and data.image_root")
        skipped: dict[str, int] = {}
        rows = load_llava_instruct(data.path, data.image_root, max_prompts=data.max_prompts, turns=data.turns,
                                   source=data.source, skipped=skipped)
        for extra in data.extra_sources:
            rows += load_llava_instruct(extra.path, extra.image_root, max_prompts=extra.max_prompts,
                                        turns=extra.turns, source=extra.source, skipped=skipped)
        rows, filtered = quality_filter(rows, data.filter)
        filtered["text_only_records"] = skipped.get("text_only", 0)
    if data.max_prompts is not None and data.source == "synthetic":  # instruction files cut it while loading
        rows = rows[: data.max_prompts]
    validate_prompts(rows, f"prompts from {data.source}")
    if not rows:
        raise InputError(f"data source {data.source!r} produced no prompts"
                         + (f" (quality filter: {filtered})" if filtered else ""))
    n_shards = 0
    for n_shards, start in enumerate(range(0, len(rows), data.shard_size), start=1):
        chunk = rows[start: start + data.shard_size]
        table = pa.Table.from_pylist([{c: r.get(c) for c in schema.PROMPTS.names} for r in chunk], schema.PROMPTS)
        store.publish_shard("prompts", n_shards - 1, table, schema.PROMPTS, key)
    store.write_json(marker, {"key": key, "n_shards": n_shards, "n_prompts": len(rows), "filter": filtered})
    return n_shards


def _synthetic_prompts(cfg: RunConfig, store: RunStore) -> list[dict[str, Any]]:
    from m3po_core.data import synthetic as world

    w = cfg.data.world
    bias = world.WorldBias.of(w)
    train = world.make_scenes(cfg.seed, "train", w.n_train_scenes, bias)
    rows = world.make_prompts(train, cfg.seed, per_scene=w.prompts_per_scene, bias=bias)
    for s in train:
        store.write_bytes(f"images/{s.scene_id}.png", png(world.render(s, w.image_size)))
    for r in rows:
        r["image"] = store.url(f"images/{r['scene_id']}.png")
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
    return store.read_table(RunStore.shard_rel("prompts", shard)).to_pylist()


def load_shard_images(rows: list[dict[str, Any]], shard: int) -> list[Image.Image]:
    return [load_image(r["image"], f"prompts shard {shard} row {i}, prompt_id {r['prompt_id']!r}")
            for i, r in enumerate(rows)]
