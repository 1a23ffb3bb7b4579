"""The benchmarks' questions: the synthetic world's held-out sets (POPE- and MME-style, IFT, the
preference prompts), or a public release imported into the store once per release.

    eval/{pope,mme}.parquet, eval/{ift,preference}.parquet (+ .json), eval/images/
    eval/public-{bench}.parquet (+ .json)         a public release's questions, images in eval/images/

Limit: a benchmark's questions are read whole (POPE's 9K and MME's 2.4K questions are small).
"""
from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa

from m3po_core.config import PUBLIC_BENCHMARKS, RunConfig
from m3po_core.data.images import png
from m3po_core.stages.runner import done_record, fingerprint, stage_key
from m3po_core.store import RunStore


def write_synthetic_benchmarks(cfg: RunConfig, store: RunStore, train_scenes) -> None:
    """The world's held-out scenes and their POPE and MME questions (written with the prompts)."""
    from m3po_core.data import synthetic as world
    from m3po_core.data.synthetic_benchmarks import mme_questions, pope_questions

    w = cfg.data.world
    bias = world.WorldBias.of(w)
    held_out = world.make_scenes(cfg.seed, "eval", w.n_eval_scenes, bias)
    for s in held_out:
        store.write_bytes(f"eval/images/{s.scene_id}.png", png(world.render(s, w.image_size)))
    for name, questions in (("pope", pope_questions(held_out, cfg.seed, train_scenes, bias)),
                            ("mme", mme_questions(held_out, cfg.seed, bias))):
        recs = [{"question_id": q["question_id"], "row_id": q.get("row_id", q["question_id"]),
                 "category": q["category"], "instruction": q["instruction"], "answer": q["answer"],
                 "image": store.url(f"eval/images/{q['scene_id']}.png")} for q in questions]
        store.write_table(f"eval/{name}.parquet", pa.Table.from_pylist(recs))


def _synthetic_preference_set(cfg: RunConfig, store: RunStore) -> None:
    """Open-ended prompts on the held-out scenes (one per scene), for the simulated preference test."""
    _synthetic_open_set(cfg, store, "preference", per_scene=1)


def _synthetic_ift_set(cfg: RunConfig, store: RunStore) -> None:
    """The synthetic world's IFT (m3po_core/evaluation/ift.py): two prompts per held-out scene, of other
    kinds than the scene's preference prompt, each with the constraints its wording implies."""
    from m3po_core.data import synthetic as world
    from m3po_core.evaluation import ift

    _synthetic_open_set(cfg, store, "ift", per_scene=3, skip_first=True, extra=lambda p: {
        "constraints": json.dumps(ift.synthetic_constraints(
            *world.parse_instruction(p["instruction"]), explained=world.explains(p["kind"], p["reference"])))})


def _synthetic_chair_set(cfg: RunConfig, store: RunStore) -> None:
    """CHAIR's description prompts on the held-out scenes (one per scene), rebuilt whenever those scenes
    change; written when first asked for, so a run that adds `chair` later gets it."""
    from m3po_core.data import synthetic as world
    from m3po_core.data.synthetic_benchmarks import chair_prompts

    key = stage_key(cfg, "prompts")
    if done_record(store, "eval/chair.json", key) is not None and store.exists("eval/chair.parquet"):
        return
    held_out = world.make_scenes(cfg.seed, "eval", cfg.data.world.n_eval_scenes, world.WorldBias.of(cfg.data.world))
    recs = [{"question_id": q["question_id"], "row_id": q["question_id"], "category": q["category"],
             "instruction": q["instruction"], "answer": q["answer"], "image": store.url(f"eval/images/{q['scene_id']}.png")}
            for q in chair_prompts(held_out)]
    store.write_table("eval/chair.parquet", pa.Table.from_pylist(recs))
    store.write_json("eval/chair.json", {"key": key, "questions": len(recs)})


def _synthetic_open_set(cfg: RunConfig, store: RunStore, name: str, per_scene: int, skip_first: bool = False,
                        extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda p: {}) -> None:
    """`eval/{name}.parquet` from the world's prompts on the held-out scenes; rebuilt whenever those
    scenes change (keyed like the prompts that rendered their images)."""
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    key = stage_key(cfg, "prompts")
    if done_record(store, f"eval/{name}.json", key) is not None and store.exists(f"eval/{name}.parquet"):
        return
    # held-out scenes follow the world's statistics; their reference answers are true (no answer bias)
    held_out = world.make_scenes(cfg.seed, "eval", cfg.data.world.n_eval_scenes, world.WorldBias.of(cfg.data.world))
    recs = [{"question_id": p["prompt_id"], "row_id": p["prompt_id"], "category": p["kind"],
             "instruction": p["instruction"], "answer": p["reference"], "scene": p["scene"], **extra(p),
             "image": store.url(f"eval/images/{p['scene_id']}.png")}
            for p in synthetic_prompts.make_prompts(held_out, cfg.seed, per_scene=per_scene,
                                                    explain=cfg.data.world.explain)
            if not (skip_first and p["prompt_id"].endswith("-q0"))]
    store.write_table(f"eval/{name}.parquet", pa.Table.from_pylist(recs))
    store.write_json(f"eval/{name}.json", {"key": key, "questions": len(recs)})


def public_sources(cfg: RunConfig) -> dict[str, Any]:
    """Each public release's files (name, size, ETag or mtime): a release replaced in place is noticed."""
    from m3po_core.evaluation import public

    return {b: public.source_fingerprint(getattr(cfg.evaluation, f"{b}_path")) for b in PUBLIC_BENCHMARKS
            if b in cfg.evaluation.benchmarks and getattr(cfg.evaluation, f"{b}_path")}


def benchmark_questions(cfg: RunConfig, store: RunStore, bench: str) -> list[dict[str, Any]]:
    """A benchmark's questions: the public release when its path is set (imported into the store
    once per release), else the synthetic world's held-out set written with the prompts."""
    source = getattr(cfg.evaluation, f"{bench}_path", None)
    if source is None:
        if bench == "preference":
            _synthetic_preference_set(cfg, store)
        if bench == "ift":
            _synthetic_ift_set(cfg, store)
        if bench == "chair":
            _synthetic_chair_set(cfg, store)
        return store.read_table(f"eval/{bench}.parquet").to_pylist()
    from m3po_core.evaluation import public

    rel = f"eval/public-{bench}.parquet"
    key = fingerprint({"source": source, "files": public_sources(cfg)[bench],
                       "suffix": cfg.evaluation.answer_suffix if bench != "ift" else "", "version": 2})
    if done_record(store, f"eval/public-{bench}.json", key) is None or not store.exists(rel):
        def put_image(name: str, data: bytes) -> str:
            store.write_bytes(f"eval/images/{name}", data)
            return store.url(f"eval/images/{name}")

        records = public.load_public_benchmark(source, bench, cfg.evaluation.answer_suffix, put_image)
        store.write_table(rel, public.to_table(records))
        store.write_json(f"eval/public-{bench}.json", {"key": key, "source": source, "questions": len(records)})
    return store.read_table(rel).to_pylist()
