"""The pipeline's stages as plain functions over a `RunStore`: what the Prefect tasks wrap.

Each stage reads the previous stage's Parquet and writes its own; nothing passes between stages
in memory. A shard's cache key is built from what decides its content (the input's content hash,
the stage's configuration section, the stage's code version), and a shard complete under its key
is skipped: a re-run recomputes only what changed or failed.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from m3po_core import schema
from m3po_core.config import PUBLIC_BENCHMARKS, RunConfig, fingerprint, stage_config
from m3po_core.errors import InputError, Interrupted
from m3po_core.store import COMPLETE, FAILED, RATING_ATTEMPTS, RUNNING, RunStore, open_url, retry_unrated

log = logging.getLogger("m3po.stages")

# Bump a stage's version when its code changes what it writes: it is part of the cache key.
CODE_VERSION = {"prompts": 1, "base_model": 1, "clip": 1, "candidates": 1, "scores": 2, "pairs": 2,
                "train": 1, "evaluate": 3, "ipa": 1}

# One model computation at a time per process: the accelerator (or the CPU's cores) is the shared
# resource, and HF sampling seeds torch's global generator.
DEVICE_LOCK = threading.RLock()
_MODELS: dict[tuple, Any] = {}
_waited = threading.local()  # seconds this thread spent queueing for the device in the current shard
# Set on Ctrl-C (flows/cli.py): only the main thread sees KeyboardInterrupt, so shards on the task
# runner's threads check this before they start; those already running finish and are kept.
STOP = threading.Event()


@contextmanager
def device_slot():
    """Hold the device; the time spent waiting for it is not the shard's compute time."""
    t0 = time.time()
    with DEVICE_LOCK:
        _waited.seconds = getattr(_waited, "seconds", 0.0) + time.time() - t0
        yield


def stage_key(cfg: RunConfig, stage: str, *inputs: Any) -> str:
    return fingerprint({"stage": stage, "version": CODE_VERSION[stage], "config": stage_config(cfg, stage),
                        "inputs": list(inputs)})


def done_record(store: RunStore, rel: str, key: str) -> dict[str, Any] | None:
    """A whole-stage record (JSON holding its cache key) if it was written under `key`, read once."""
    try:
        record = store.read_json(rel)
    except FileNotFoundError:
        return None
    return record if record.get("key") == key else None


@dataclass(frozen=True)
class ShardResult:
    stage: str
    shard: int
    rows: int
    cached: bool
    seconds: float


# -------------------------------------------------------------------------------------------------
# Inputs


def load_image(url: str, where: str) -> Image.Image:
    """Open an image by URL; a missing or undecodable file is an InputError naming it and `where`."""
    try:
        with open_url(url) as f:
            img = Image.open(io.BytesIO(f.read()))
            img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{url}: image file not found ({where})") from None
    except Exception as e:  # PIL raises several types for corrupt data
        raise InputError(f"{url}: cannot decode image ({where}): {e}") from None


def _validate_prompts(rows: list[dict[str, Any]], where: str) -> None:
    first_row: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.get("prompt_id") in first_row:
            raise InputError(f"{where} row {i}: prompt_id {r['prompt_id']!r} repeats row {first_row[r['prompt_id']]}")
        first_row[r.get("prompt_id")] = i
        if not (r.get("instruction") or "").strip():
            raise InputError(f"{where} row {i} (prompt_id {r.get('prompt_id')!r}): empty instruction")
        if not r.get("image"):
            raise InputError(f"{where} row {i} (prompt_id {r.get('prompt_id')!r}): no image reference")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------
# Stage 1: prompts (and, for the synthetic world, the held-out benchmarks)


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
    _validate_prompts(rows, f"prompts from {data.source}")
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
    train = world.make_scenes(cfg.seed, "train", w.n_train_scenes)
    rows = world.make_prompts(train, cfg.seed, per_scene=w.prompts_per_scene)
    for s in train:
        store.write_bytes(f"images/{s.scene_id}.png", _png(world.render(s, w.image_size)))
    for r in rows:
        r["image"] = store.url(f"images/{r['scene_id']}.png")
        r["source"] = "synthetic"
    _synthetic_benchmarks(cfg, store, train)
    return rows


def _synthetic_benchmarks(cfg: RunConfig, store: RunStore, train_scenes) -> None:
    from m3po_core.data import synthetic as world

    w = cfg.data.world
    held_out = world.make_scenes(cfg.seed, "eval", w.n_eval_scenes)
    for s in held_out:
        store.write_bytes(f"eval/images/{s.scene_id}.png", _png(world.render(s, w.image_size)))
    for name, questions in (("pope", world.pope_questions(held_out, cfg.seed, train_scenes)),
                            ("mme", world.mme_questions(held_out, cfg.seed))):
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
        "constraints": json.dumps(ift.synthetic_constraints(*world.parse_instruction(p["instruction"])))})


def _synthetic_open_set(cfg: RunConfig, store: RunStore, name: str, per_scene: int, skip_first: bool = False,
                        extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda p: {}) -> None:
    """`eval/{name}.parquet` from the world's prompts on the held-out scenes; rebuilt whenever those
    scenes change (keyed like the prompts that rendered their images)."""
    from m3po_core.data import synthetic as world

    key = stage_key(cfg, "prompts")
    if done_record(store, f"eval/{name}.json", key) is not None and store.exists(f"eval/{name}.parquet"):
        return
    held_out = world.make_scenes(cfg.seed, "eval", cfg.data.world.n_eval_scenes)
    recs = [{"question_id": p["prompt_id"], "row_id": p["prompt_id"], "category": p["kind"],
             "instruction": p["instruction"], "answer": p["reference"], "scene": p["scene"], **extra(p),
             "image": store.url(f"eval/images/{p['scene_id']}.png")}
            for p in world.make_prompts(held_out, cfg.seed, per_scene=per_scene)
            if not (skip_first and p["prompt_id"].endswith("-q0"))]
    store.write_table(f"eval/{name}.parquet", pa.Table.from_pylist(recs))
    store.write_json(f"eval/{name}.json", {"key": key, "questions": len(recs)})


def read_prompts_shard(store: RunStore, shard: int) -> list[dict[str, Any]]:
    return store.read_table(RunStore.shard_rel("prompts", shard)).to_pylist()


def load_shard_images(rows: list[dict[str, Any]], shard: int) -> list[Image.Image]:
    return [load_image(r["image"], f"prompts shard {shard} row {i}, prompt_id {r['prompt_id']!r}")
            for i, r in enumerate(rows)]


# -------------------------------------------------------------------------------------------------
# Models built here: the tiny LLaVA base policy and the tiny CLIP


STORE_REF = "store:"


def resolve_model(store: RunStore, ref: str) -> str:
    """A local path or hub name for a model reference. `store:_models/...` references name models
    built here, kept beside the runs: every worker resolves them to its own local copy, so cache
    keys (which contain the reference) agree across machines."""
    return store.local_dir(ref[len(STORE_REF):], shared=True) if ref.startswith(STORE_REF) else ref


def ensure_base_model(cfg: RunConfig, store: RunStore, log_fn: Callable[[str], None] = log.info) -> str:
    """A reference to the base policy: a hub name/path as given, or the tiny LLaVA built,
    warm-started and kept under `{root}/_models/` so later runs reuse it."""
    from m3po_core import models

    if cfg.model.name != models.TINY_NAME:
        return cfg.model.name
    from m3po_core.data import synthetic as world

    key = stage_key(cfg, "base_model", world.vocabulary())
    rel = f"_models/tiny-llava-{key}"
    if not store.dir_complete(rel, shared=True):
        w, m = cfg.data.world, cfg.model
        model, processor = models.build_tiny_llava(world.vocabulary(), seed=m.seed)
        model.to(models.pick_device(m.device))
        scenes = world.make_scenes(cfg.seed, "sft", w.n_sft_scenes)
        rows = world.make_prompts(scenes, cfg.seed, per_scene=4)
        images = {s.scene_id: world.render(s, w.image_size) for s in scenes}
        t0 = time.time()
        losses = models.supervised_warm_start(
            model, processor, [images[r["scene_id"]] for r in rows], [r["instruction"] for r in rows],
            [r["reference"] for r in rows], steps=m.sft_steps, batch_size=m.sft_batch_size, lr=m.sft_lr,
            seed=m.seed, log_fn=log_fn)
        quality = _measure_base_accuracy(cfg, model, processor)
        log_fn(f"tiny LLaVA warm-started in {time.time() - t0:.0f}s: held-out judge accuracy "
               f"{quality['accuracy']:.2f} (yes/no questions {quality['yes_no_accuracy']:.2f}, chance 0.50)")
        with tempfile.TemporaryDirectory() as tmp:
            models.save_vlm(model, processor, tmp)
            with open(f"{tmp}/m3po_warm_start.json", "w") as f:
                json.dump({"key": key, "final_loss": losses[-1], "losses": losses, **quality}, f)
            store.put_dir(tmp, rel, shared=True)
    return STORE_REF + rel


def _measure_base_accuracy(cfg: RunConfig, model, processor) -> dict[str, float]:
    """Greedy answers on a validation split (never the evaluation split) scored by the reference judge."""
    from m3po_core.data import synthetic as world
    from m3po_core.sampling import greedy_batched
    from m3po_core.sampling.transformers_backend import TransformersSampler
    from m3po_core.scoring.judge import JudgeItem, ReferenceJudge

    scenes = world.make_scenes(cfg.seed, "val", 48)
    rows = world.make_prompts(scenes, cfg.seed, per_scene=4)
    imgs = {s.scene_id: world.render(s, cfg.data.world.image_size) for s in scenes}
    answers = greedy_batched(TransformersSampler(model, processor), [imgs[r["scene_id"]] for r in rows],
                             [r["instruction"] for r in rows], max_new_tokens=32, batch_size=64)
    items = [JudgeItem(r["prompt_id"], r["instruction"], a, meta={"scene": r["scene"], "kind": r["kind"],
                                                                  "reference": r["reference"]})
             for r, a in zip(rows, answers)]
    acc = np.array([s.accuracy for s in ReferenceJudge().score(items)])
    yes_no = np.array([r["kind"] in ("exist", "colour_check", "count_check", "position_check") for r in rows])
    return {"accuracy": float(acc.mean()), "yes_no_accuracy": float(acc[yes_no].mean()), "n_val": len(rows)}


def ensure_clip(cfg: RunConfig, store: RunStore, log_fn: Callable[[str], None] = log.info) -> str:
    """A reference to the CLIP encoder: trained here for `m3po-tiny-clip`, else the open_clip name."""
    c = cfg.scoring.clip
    if c.name != "m3po-tiny-clip":
        return c.name
    from m3po_core.data import synthetic as world
    from m3po_core.scoring.clip import train_tiny_clip

    key = stage_key(cfg, "clip")
    rel = f"_models/tiny-clip-{key}"
    if not store.dir_complete(rel, shared=True):
        w = cfg.data.world
        scenes = world.make_scenes(cfg.seed, "sft", w.n_sft_scenes)
        val = world.make_scenes(cfg.seed, "val", 128)
        with device_slot():
            scorer, metrics = train_tiny_clip(
                [world.render(s, w.image_size) for s in scenes], [world.caption(s) for s in scenes],
                steps=c.train_steps, batch_size=c.train_batch_size, seed=cfg.seed,
                heldout_images=[world.render(s, w.image_size) for s in val],
                heldout_captions=[world.caption(s) for s in val], log=log_fn)
        log_fn(f"tiny CLIP: held-out retrieval top-1 {metrics['retrieval_top1']:.2f} "
               f"(chance {metrics['retrieval_chance']:.2f})")
        with tempfile.TemporaryDirectory() as tmp:
            scorer.save(tmp)
            store.put_dir(tmp, rel, shared=True)
    return STORE_REF + rel


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Load a model once per process (a worker serves many shards with one copy)."""
    with device_slot():
        if key not in _MODELS:
            t0 = time.time()
            _MODELS[key] = build()
            log.info("loaded %s %s in this process (pid %d) in %.1fs", key[0], key[1], os.getpid(), time.time() - t0)
        return _MODELS[key]


def get_vlm(cfg: RunConfig, store: RunStore, model_ref: str):
    from m3po_core.models import load_vlm

    return _cached(("vlm", model_ref, cfg.model.device, cfg.model.dtype),
                   lambda: load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype))


def get_sampler(cfg: RunConfig, store: RunStore, model_ref: str):
    """The configured sampling backend, built once per process."""
    s = cfg.sampling
    if s.backend == "openai":
        from m3po_core.sampling.openai_backend import OpenAICompatibleSampler

        return _cached(("openai-sampler", s.base_url, s.served_model or model_ref),
                       lambda: OpenAICompatibleSampler(model=s.served_model or model_ref, base_url=s.base_url,
                                                       api_key_env=s.api_key_env, concurrency=s.concurrency))
    if s.backend == "vllm":
        return get_vllm(cfg, store, model_ref)
    from m3po_core.sampling import make_sampler

    return make_sampler(s.backend, *get_vlm(cfg, store, model_ref))


def get_vllm(cfg: RunConfig, store: RunStore, model_ref: str):
    """One vLLM engine per process and base model, LoRA enabled so evaluation reuses it for the adapter."""
    from m3po_core.sampling.vllm_backend import VLLMSampler

    s = cfg.sampling
    return _cached(("vllm", model_ref, cfg.model.dtype),
                   lambda: VLLMSampler(resolve_model(store, model_ref), tensor_parallel_size=s.tensor_parallel_size,
                                       dtype=cfg.model.dtype, max_model_len=s.max_model_len,
                                       gpu_memory_utilization=s.gpu_memory_utilization, enable_lora=True,
                                       # vLLM accepts only these ranks as the engine's maximum
                                       max_lora_rank=next(r for r in (8, 16, 32, 64, 128, 256, 320, 512)
                                                          if r >= cfg.training.lora_r), seed=s.seed))


def release_engines() -> None:
    """Shut down this process's vLLM engines (they reserve `gpu_memory_utilization` of the GPU);
    evaluation builds one again when it needs it."""
    engines = [k for k in _MODELS if k[0] == "vllm"]
    if not engines:
        return
    import gc

    for k in engines:
        engine = _MODELS.pop(k)
        shutdown = getattr(getattr(engine, "llm", None), "llm_engine", None)
        if shutdown is not None and hasattr(shutdown, "engine_core"):
            shutdown.engine_core.shutdown()  # V1 runs the engine core in a process of its own
        del engine
    gc.collect()
    if _has_cuda():
        import torch

        torch.cuda.empty_cache()
    log.info("released %d vLLM engine(s) before training", len(engines))


def get_judge(cfg: RunConfig, store: RunStore):
    """The configured judge, built once per process; a model judge caches its ratings beside the runs
    (or in the local cache for a remote store)."""
    from m3po_core.scoring.mas import make_judge

    cache = store.shared_path("_judge_cache") if store.is_local else \
        str(Path(os.environ.get("M3PO_CACHE", Path(tempfile.gettempdir()) / "m3po-cache")) / "judge")
    return _cached(("judge", fingerprint(cfg.scoring)), lambda: make_judge(cfg.scoring, cache_dir=cache))


def get_clip(cfg: RunConfig, store: RunStore, clip_ref: str):
    from m3po_core.scoring.clip import load_encoder

    device = "cuda" if cfg.model.device in ("auto", "cuda") and _has_cuda() else "cpu"
    main = _cached(("clip", clip_ref, cfg.scoring.clip.pretrained),
                   lambda: load_encoder(resolve_model(store, clip_ref), cfg.scoring.clip.pretrained, device))
    if not cfg.scoring.extra_encoders:
        return main
    from m3po_core.scoring.ensemble import EncoderEnsemble

    return EncoderEnsemble([main] + [_cached(("clip", e.name, e.pretrained),
                                             lambda e=e: load_encoder(e.name, e.pretrained, device))
                                     for e in cfg.scoring.extra_encoders])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -------------------------------------------------------------------------------------------------
# Sharded stages: sampling and scoring


def _run_shard(store: RunStore, stage: str, shard: int, key: str, compute: Callable[[], pa.Table],
               table_schema: pa.Schema, extra: Callable[[], dict[str, Any]] | None = None) -> ShardResult:
    """Skip a shard complete under `key`; otherwise compute it, publish it whole, or record the failure."""
    t0 = time.time()
    if store.shard_done(stage, shard, key):
        entry = store.shard_entry(stage, shard)
        return ShardResult(stage, shard, entry["rows"], True, 0.0)
    if STOP.is_set():
        raise Interrupted(f"{stage} shard {shard} not started: the run was interrupted")
    store.mark_shard(stage, shard, RUNNING, key)
    _waited.seconds = 0.0
    try:
        table = compute()
        wall = time.time() - t0
        entry = store.publish_shard(stage, shard, table, table_schema, key, seconds=wall - _waited.seconds,
                                    wall_seconds=wall, host=socket.gethostname(), pid=os.getpid(),
                                    **(extra() if extra else {}))
    except BaseException as e:  # KeyboardInterrupt too: the manifest must say the shard is not done
        store.mark_shard(stage, shard, FAILED, key, error=f"{type(e).__name__}: {e}")
        raise
    return ShardResult(stage, shard, entry["rows"], False, entry["seconds"])


def sample_shard(cfg: RunConfig, store: RunStore, shard: int, model_ref: str) -> ShardResult:
    from m3po_core.sampling import SamplingParams, batch_seed

    s = cfg.sampling
    prompts_entry = store.shard_entry("prompts", shard)
    key = stage_key(cfg, "candidates", prompts_entry["sha256"], model_ref)

    def compute() -> pa.Table:
        rows = read_prompts_shard(store, shard)
        _validate_prompts(rows, f"prompts shard {shard}")
        images = load_shard_images(rows, shard)
        sampler = get_sampler(cfg, store, model_ref)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=s.seed)
        out: dict[str, list] = {c: [] for c in schema.CANDIDATES.names}
        for start in range(0, len(rows), s.batch_prompts):
            batch = rows[start: start + s.batch_prompts]
            seed = batch_seed(s.seed, [r["prompt_id"] for r in batch])
            with device_slot():
                cands = sampler.sample(images[start: start + len(batch)], [r["instruction"] for r in batch],
                                       params, seed)
            for r, row_cands in zip(batch, cands):
                for j, c in enumerate(row_cands):
                    _add_candidate(out, r["prompt_id"], j, c, sampler.name, "")
            if s.contrastive_n:  # extra candidates on perturbed images: hard negatives (never chosen)
                from m3po_core import perturb

                jobs = [(r, k, *perturb.draw(s.seed, r["prompt_id"], k))
                        for r in batch for k in range(s.contrastive_n)]
                by_id = {r["prompt_id"]: images[start + i] for i, r in enumerate(batch)}
                one = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p,
                                     max_new_tokens=s.max_new_tokens, seed=s.seed)
                with device_slot():
                    cands = sampler.sample([perturb.perturb(by_id[r["prompt_id"]], kind, ps) for r, _, kind, ps in jobs],
                                           [r["instruction"] for r, *_ in jobs], one,
                                           batch_seed(s.seed + CONTRASTIVE_SEED, [r["prompt_id"] for r in batch]))
                for (r, k, kind, _), (c,) in zip(jobs, cands):
                    _add_candidate(out, r["prompt_id"], s.n + k, c, sampler.name, kind)
        return pa.table(out, schema=schema.CANDIDATES)

    return _run_shard(store, "candidates", shard, key, compute, schema.CANDIDATES)


CONTRASTIVE_SEED = 1_000_003  # the contrastive calls' seeds come from another stream than the normal samples'


def _add_candidate(out: dict[str, list], prompt_id: str, idx: int, c, sampler: str, perturbation: str) -> None:
    for col, val in (("prompt_id", prompt_id), ("cand_idx", idx), ("text", c.text), ("token_ids", c.token_ids),
                     ("logp_sum", c.logp_sum), ("logp_mean", c.logp_mean), ("n_tokens", c.n_tokens),
                     ("finish_reason", c.finish_reason), ("sampler", sampler), ("seed", c.seed),
                     ("perturbation", perturbation)):
        out[col].append(val)


SPENDING = ("requests", "failed_requests", "prompt_tokens", "completion_tokens", "cost")  # judge usage that adds up


def score_shard(cfg: RunConfig, store: RunStore, shard: int, clip_ref: str) -> ShardResult:
    from m3po_core.scoring.mas import score_candidates

    cand_entry = store.shard_entry("candidates", shard)
    if not cand_entry or cand_entry.get("state") != COMPLETE:
        raise RuntimeError(f"scores shard {shard}: candidates shard {shard} is not complete")
    key = stage_key(cfg, "scores", cand_entry["sha256"], clip_ref)
    usage: dict[str, Any] = {}
    unrated = {"n": 0}
    # A retry of a shard left with unrated candidates: its record is replaced, so what the earlier
    # attempts spent is carried into the new one (the report's requests, tokens and cost stay whole).
    previous = store.shard_entry("scores", shard) or {}
    retry = previous.get("key") == key and retry_unrated(previous)
    spent_before = previous.get("judge_usage", {}) if retry else {}
    attempts = previous.get("attempts", 1) + 1 if retry else 1

    def compute() -> pa.Table:
        rows = read_prompts_shard(store, shard)
        images = load_shard_images(rows, shard)
        cands = store.read_table(RunStore.shard_rel("candidates", shard))
        clip = get_clip(cfg, store, clip_ref)
        judge = get_judge(cfg, store)
        with device_slot():  # one shard at a time per process: the judge's usage delta is this shard's
            before = dict(getattr(judge, "usage", {}))
            table = score_candidates(rows, images, cands, clip, cfg.scoring, judge=judge)
            after = dict(getattr(judge, "usage", {}))
        usage.update({k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))})
        if after.get("cost") is not None:
            usage["cost"] = after["cost"] - (before.get("cost") or 0.0)
        for k in SPENDING:
            if isinstance(spent_before.get(k), (int, float)) and usage.get(k) is not None:
                usage[k] += spent_before[k]
        # candidates with no rating at all (an ensemble's candidate one judge rated has a score)
        unrated["n"] = int(np.isnan(table.column("judge").to_numpy(zero_copy_only=False).astype(float)).sum())
        if unrated["n"]:
            log.warning("scores shard %d: %d candidate(s) left unrated after attempt %d of %d%s", shard,
                        unrated["n"], attempts, RATING_ATTEMPTS,
                        "; a re-run retries them" if attempts < RATING_ATTEMPTS else "")
        return table

    # What this shard cost the judge (requests, tokens, cost), in its manifest record for the report;
    # `unrated` (ratings still missing after the judge's retries) makes the store treat the shard as
    # not done, so a re-run asks the judge again for those (the rest come from its cache).
    return _run_shard(store, "scores", shard, key, compute, schema.SCORES,
                      extra=lambda: {"judge_usage": usage, "unrated": unrated["n"], "attempts": attempts}
                      if usage else {})


# -------------------------------------------------------------------------------------------------
# Selection, training, evaluation


def shard_candidates_with_scores(store: RunStore, shard: int, columns: list[str] | None = None) -> pa.Table:
    """One shard's candidates (every column, or the keys and `columns`) with their scores, one row per
    (prompt_id, cand_idx), in that order."""
    order = [("prompt_id", "ascending"), ("cand_idx", "ascending")]
    for stage in ("candidates", "scores"):
        if (store.shard_entry(stage, shard) or {}).get("state") != COMPLETE:
            raise RuntimeError(f"{store.url(stage)}: shard {shard} is not complete")
    if columns is not None:
        columns = ["prompt_id", "cand_idx", *(c for c in columns if c in schema.CANDIDATES.names)]
    cands = store.read_table(RunStore.shard_rel("candidates", shard), columns).sort_by(order)
    scores = store.read_table(RunStore.shard_rel("scores", shard)).sort_by(order)
    # Arrow's hash join cannot carry list columns (token_ids): align by sorted keys instead.
    for k in ("prompt_id", "cand_idx"):
        if not cands.column(k).equals(scores.column(k)):
            raise RuntimeError(f"{store.url()}: candidates and scores shard {shard} do not cover the same "
                               "(prompt_id, cand_idx)")
    for name in scores.column_names[2:]:
        cands = cands.append_column(name, scores.column(name))
    return cands


def candidates_with_scores(store: RunStore, n_shards: int, columns: list[str] | None = None) -> pa.Table:
    """Every shard's candidates with their scores; with `columns`, only those (read shard by shard,
    so the texts and token ids of millions of candidates are never in memory together)."""
    tables = (shard_candidates_with_scores(store, i, columns) for i in range(n_shards))
    return pa.concat_tables([t if columns is None else t.select(columns) for t in tables])


def select(cfg: RunConfig, store: RunStore, n_shards: int) -> dict[str, Any]:
    """pairs.parquet (+ pairs_stats.json) from every candidate and score shard.

    A prompt's pair depends on its own candidates only, so shards are selected one at a time: at
    the paper's scale (150K prompts x 32 candidates) the texts and token ids of every candidate
    would not fit in memory at once, and only the chosen and rejected ones are ever needed."""
    from m3po_core.selection import SelectionStats, select_pairs

    sel = cfg.selection
    inputs = [store.shard_entry(st, i)["sha256"] for st in ("candidates", "scores") for i in range(n_shards)]
    key = stage_key(cfg, "pairs", inputs)
    if (record := done_record(store, "pairs_stats.json", key)) is not None and store.exists("pairs.parquet"):
        return record
    parts, stats = [], SelectionStats(0, 0, 0, 0, 0)
    for shard in range(n_shards):
        table = shard_candidates_with_scores(store, shard)
        chosen, shard_stats = select_pairs(table.append_column("logp", table.column(sel.logp)), alpha=sel.alpha,
                                           delta=sel.delta, strategy=sel.strategy, seed=sel.seed)
        stats += shard_stats
        if chosen.num_rows:
            parts.append(_pairs_with_texts(store, shard, chosen, table))
    pairs = pa.concat_tables(parts).sort_by("prompt_id") if parts else schema.PAIRS.empty_table()
    info = store.write_table("pairs.parquet", pairs, schema.PAIRS)
    result = {"key": key, **stats.as_dict(), "sha256": info["sha256"], "strategy": sel.strategy,
              "alpha": 0.0 if sel.strategy in ("mas_gap", "rm_best_worst") else sel.alpha, "delta": sel.delta, "logp": sel.logp,
              "mean_mas_gap": _mean(pairs, "mas_chosen", "mas_rejected"),
              "mean_logp_gap": _mean(pairs, "logp_chosen", "logp_rejected")}
    store.write_json("pairs_stats.json", result)
    return result


def _pairs_with_texts(store: RunStore, shard: int, chosen: pa.Table, candidates: pa.Table) -> pa.Table:
    """A shard's selected pairs with their prompt (image, instruction) and both responses' texts and
    token ids. Rows are taken by index (an Arrow hash join would allocate its output for 32K rows,
    and every shard's pairs are kept until the stage ends)."""
    pid = chosen.column("prompt_id").to_pylist()
    prompts = store.read_table(RunStore.shard_rel("prompts", shard), ["prompt_id", "image", "instruction"])
    prompt_row = {p: r for r, p in enumerate(prompts.column("prompt_id").to_pylist())}
    cand_row = {k: r for r, k in enumerate(zip(candidates.column("prompt_id").to_pylist(),
                                               candidates.column("cand_idx").to_pylist()))}
    if missing := sorted(set(pid) - prompt_row.keys()):
        raise RuntimeError(f"{store.url('prompts')}: shard {shard} lacks prompts {missing[:5]} that its "
                           "candidates answer (was the prompts stage re-run without sampling?)")
    pairs = chosen
    rows = pa.array([prompt_row[p] for p in pid], pa.int64())
    for name in ("image", "instruction"):
        pairs = pairs.append_column(name, prompts.column(name).take(rows))
    for name in ("chosen", "rejected"):
        rows = pa.array([cand_row[(p, i)] for p, i in zip(pid, chosen.column(f"{name}_idx").to_pylist())], pa.int64())
        pairs = pairs.append_column(name, candidates.column("text").take(rows))
        pairs = pairs.append_column(f"{name}_token_ids", candidates.column("token_ids").take(rows))
    return pairs


def _mean(t: pa.Table, a: str, b: str) -> float:
    if t.num_rows == 0:
        return float("nan")
    return float(np.mean(t.column(a).to_numpy() - t.column(b).to_numpy()))


def train(cfg: RunConfig, store: RunStore, model_ref: str, log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """LoRA-DPO on pairs.parquet; the adapter lands in `adapter/`, the log in `train_log.json`.
    In this process, or over `training.num_processes` processes through `accelerate launch`."""
    pairs_sha = store.read_json("pairs_stats.json")["sha256"]
    key = stage_key(cfg, "train", pairs_sha, model_ref)
    if (record := done_record(store, "train_log.json", key)) is not None and store.dir_complete("adapter"):
        return record
    release_engines()  # also before `accelerate launch`: its ranks need the GPU this process's engine holds
    t0 = time.time()
    with device_slot(), tempfile.TemporaryDirectory() as tmp:
        if cfg.training.num_processes > 1:
            from m3po_core.distributed import launch_training

            history = launch_training(cfg, store, model_ref, tmp, log_fn=log_fn)
        else:
            history = train_adapter(cfg, store, model_ref, tmp, log_fn=log_fn)
        store.put_dir(tmp, "adapter")
    result = {"key": key, "pairs": store.read_json("pairs_stats.json")["pairs"], "seconds": time.time() - t0,
              "history": history, "num_processes": cfg.training.num_processes}
    store.write_json("train_log.json", result)
    return result


def train_adapter(cfg: RunConfig, store: RunStore, model_ref: str, output_dir: str,
                  log_fn: Callable[[str], None] = log.info, pairs_rel: str = "pairs.parquet") -> list[dict[str, float]]:
    """Read the pairs and their images, train, save the adapter to `output_dir` (every rank of a
    distributed run calls this; the trainer shards the data and rank 0 saves)."""
    from m3po_core.models import load_vlm
    from m3po_core.training import pairs_dataset, train_lora_dpo

    release_engines()  # a vLLM engine holds most of the GPU: training on the same GPU needs it back
    pairs = store.read_table(pairs_rel).to_pylist()
    if not pairs:
        raise InputError(f"{store.url(pairs_rel)}: no preference pairs to train on")
    empty = [i for i, p in enumerate(pairs) if not p["chosen_token_ids"] or not p["rejected_token_ids"]]
    if empty:  # e.g. a server that ignored return_tokens_as_token_ids: DPO would learn nothing
        raise InputError(f"{store.url(pairs_rel)} rows {empty[:10]}: responses without sampled token ids")
    images = [load_image(p["image"], f"{pairs_rel} row {i}, prompt_id {p['prompt_id']!r}")
              for i, p in enumerate(pairs)]
    model, processor = load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype)  # own copy: LoRA is injected
    dataset = pairs_dataset(images, [p["instruction"] for p in pairs], pairs)
    return train_lora_dpo(model, processor, dataset, cfg.training, output_dir, log_fn=log_fn)


def evaluate(cfg: RunConfig, store: RunStore, model_ref: str, log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Greedy answers of the base model and of base + adapter on the held-out benchmarks; metrics.json.
    The base model's side is cached beside the benchmarks (`eval/base_metrics.json`): every run and
    every experiment cell on the same prompts and base model shares it."""
    train_key = store.read_json("train_log.json")["key"]
    key = stage_key(cfg, "evaluate", train_key, model_ref, _public_sources(cfg))
    record = done_record(store, "metrics.json", key)
    if not (attempt := _rating_attempt(record, "base", "m3po")):
        return record
    base = evaluate_base(cfg, store, model_ref, log_fn)
    trained = _evaluate_model(cfg, store, model_ref, "m3po", "predictions", log_fn, weights_key=train_key)
    if "preference" in trained:  # pairwise against the base model's responses to the same prompts
        from m3po_core.evaluation import preference

        overall = lambda rel: dict(zip(*(store.read_table(rel).column(c).to_pylist() for c in ("question_id", "overall"))))
        trained["preference"].update(preference.win_rate(overall("predictions/ratings-m3po-preference.parquet"),
                                                         overall("eval/ratings-base-preference.parquet")))
        log_fn(f"m3po preference: win rate vs base {trained['preference']['win_rate']:.3f}")
    metrics = {"key": key, "base": base["metrics"], "m3po": trained, "attempts": attempt}
    store.write_json("metrics.json", metrics)
    return metrics


def _rating_attempt(record: dict[str, Any] | None, *sides: str) -> int:
    """0 when `record` (metrics under the current key, or None) is done; else the number of the
    attempt to make. Metrics with answers the judge left unrated are not done until they have been
    tried RATING_ATTEMPTS times: a re-run rates those again (predictions are cached per shard and the
    other ratings in the judge's cache, so only the missing ratings cost anything), as scores do."""
    if record is None:
        return 1
    unrated = sum(m.get("unrated", 0) for side in sides for m in record[side].values() if isinstance(m, dict))
    return record.get("attempts", 1) + 1 if retry_unrated({"unrated": unrated, **record}) else 0


def evaluate_base(cfg: RunConfig, store: RunStore, model_ref: str,
                  log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    key = stage_key(cfg, "evaluate", "base", model_ref, _public_sources(cfg))
    record = done_record(store, "eval/base_metrics.json", key)
    if not (attempt := _rating_attempt(record, "metrics")):
        return record
    record = {"key": key, "metrics": _evaluate_model(cfg, store, model_ref, "base", "eval", log_fn,
                                                     weights_key=["base", model_ref]), "attempts": attempt}
    store.write_json("eval/base_metrics.json", record)
    return record


def _evaluate_model(cfg: RunConfig, store: RunStore, model_ref: str, model_name: str, folder: str,
                    log_fn: Callable[[str], None], weights_key: Any) -> dict[str, Any]:
    """One model on every configured benchmark. Predictions are cached per shard of questions
    (`{folder}/predictions-{model}-{bench}/shard-*.parquet` with a manifest, like sampling): an
    interrupted evaluation resumes where it stopped, and the model is loaded only if a shard
    needs computing. `weights_key` says which weights answered (base model, or the adapter's run)."""
    from m3po_core.evaluation import ift, mme, pope, preference
    from m3po_core.sampling import greedy_batched

    loaded: dict[str, Any] = {}

    def sampler():
        if "sampler" not in loaded:
            loaded["sampler"] = eval_sampler(cfg, store, model_ref, model_name)
        return loaded["sampler"]

    images: dict[str, Image.Image] = {}

    def image_of(q: dict[str, Any], bench: str) -> Image.Image:
        if q["image"] not in images:  # each image read once, however many questions it has
            images[q["image"]] = load_image(q["image"], f"{bench} question {q['question_id']}")
        return images[q["image"]]

    metrics: dict[str, Any] = {}
    size = cfg.evaluation.shard_size
    for bench in cfg.evaluation.benchmarks:
        questions = benchmark_questions(cfg, store, bench)
        max_new_tokens = cfg.evaluation.max_new_tokens
        if bench in OPEN_ENDED:
            max_new_tokens = cfg.evaluation.open_max_new_tokens or max_new_tokens
        stage = f"{folder}/predictions-{model_name}-{bench}"
        n_shards = 0
        for n_shards, start in enumerate(range(0, len(questions), size), start=1):
            chunk = questions[start: start + size]
            key = stage_key(cfg, "evaluate", weights_key, bench,
                            fingerprint([[q["row_id"], q["instruction"], q["image"]] for q in chunk]))

            def compute(chunk=chunk) -> pa.Table:
                with device_slot():
                    preds = greedy_batched(sampler(), [image_of(q, bench) for q in chunk],
                                           [q["instruction"] for q in chunk], max_new_tokens,
                                           cfg.evaluation.batch_size)
                return pa.Table.from_pylist(
                    [{**{c: q.get(c) for c in schema.PREDICTIONS.names}, "prediction": p, "model": model_name,
                      "benchmark": bench} for q, p in zip(chunk, preds)], schema.PREDICTIONS)

            _run_shard(store, stage, n_shards - 1, key, compute, schema.PREDICTIONS)
        records = store.read_stage(stage, n_shards).to_pylist() if n_shards else []
        preds = [r["prediction"] for r in records]
        if bench == "preference":
            metrics[bench] = preference.score(questions, _judge_ratings(cfg, store, bench, questions, image_of, preds,
                                                                        model_name, folder))
        elif bench == "ift":
            ratings = (_judge_ratings(cfg, store, bench, questions, image_of, preds, model_name, folder)
                       if ift.needs_judge(questions) else None)
            metrics[bench] = ift.score([{**q, "prediction": p} for q, p in zip(questions, preds)], ratings)
        else:
            metrics[bench] = {"pope": pope.score, "mme": mme.score}[bench](records)
        log_fn(f"{model_name} {bench}: " + _headline(bench, metrics[bench]))
    return metrics


OPEN_ENDED = ("ift", "preference")  # benchmarks answered at length (evaluation.open_max_new_tokens)


def _judge_ratings(cfg: RunConfig, store: RunStore, bench: str, questions, image_of, preds, model_name: str,
                   folder: str) -> list[Any]:
    """The judge's ratings of one model's responses, kept per question (`{folder}/ratings-{model}-{bench}`)
    for the pairwise comparison and for inspection; None where the judge could not rate."""
    from m3po_core.scoring.judge import JudgeItem

    items = [JudgeItem(q["question_id"], q["instruction"], p, image=image_of(q, bench),
                       meta={"scene": q.get("scene"), "kind": q["category"], "reference": q["answer"]})
             for q, p in zip(questions, preds)]
    ratings = get_judge(cfg, store).score(items)
    store.write_table(f"{folder}/ratings-{model_name}-{bench}.parquet", pa.Table.from_pylist(
        [{"question_id": q["question_id"], "overall": r.overall if r else None,
          "accuracy": r.accuracy if r else None, "relevance": r.relevance if r else None,
          "adherence": r.adherence if r else None} for q, r in zip(questions, ratings)]))
    return ratings


def _public_sources(cfg: RunConfig) -> dict[str, Any]:
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
        return store.read_table(f"eval/{bench}.parquet").to_pylist()
    from m3po_core.evaluation import public

    rel = f"eval/public-{bench}.parquet"
    key = fingerprint({"source": source, "files": _public_sources(cfg)[bench],
                       "suffix": cfg.evaluation.answer_suffix if bench != "ift" else "", "version": 1})
    if done_record(store, f"eval/public-{bench}.json", key) is None or not store.exists(rel):
        def put_image(name: str, data: bytes) -> str:
            store.write_bytes(f"eval/images/{name}", data)
            return store.url(f"eval/images/{name}")

        records = public.load_public_benchmark(source, bench, cfg.evaluation.answer_suffix, put_image)
        store.write_table(rel, public.to_table(records))
        store.write_json(f"eval/public-{bench}.json", {"key": key, "source": source, "questions": len(records)})
    return store.read_table(rel).to_pylist()


def _headline(bench: str, m: dict[str, Any]) -> str:
    if bench == "ift":
        return (f"prompt accuracy {m['prompt_accuracy']:.3f} constraint accuracy {m['constraint_accuracy']:.3f} "
                f"({m['unrated']} unrated)")
    if bench == "preference":
        return (f"accuracy {m['accuracy']:.2f} relevance {m['relevance']:.2f} helpfulness {m['helpfulness']:.2f} "
                f"(1-5; {m['unrated']} unrated)")
    if bench == "pope":
        return f"accuracy {m['accuracy']:.3f} f1 {m['f1']:.3f} yes-ratio {m['yes_ratio']:.2f}"
    return f"score {m['score']:.1f}"


def eval_sampler(cfg: RunConfig, store: RunStore, model_ref: str, which: str):
    """What answers the benchmarks for `which` ("base" or the trained adapter), through the configured
    backend (`evaluation.backend`, default the sampling backend): a sampler whose `greedy` answers."""
    from m3po_core.sampling import AdapterSampler

    backend = cfg.evaluation.backend or cfg.sampling.backend
    if backend == "vllm":
        engine = get_vllm(cfg, store, model_ref)
        return engine if which == "base" else AdapterSampler(engine, store.local_dir("adapter"))
    if backend == "openai":
        from m3po_core.sampling.openai_backend import OpenAICompatibleSampler, load_lora_adapter

        s = cfg.sampling
        served = s.served_model or model_ref
        if which != "base":
            served = cfg.evaluation.served_adapter or load_lora_adapter(
                s.base_url, s.api_key_env, f"m3po-{store.run_id}-{store.read_json('train_log.json')['key'][:8]}",
                store.local_dir("adapter"))
        return OpenAICompatibleSampler(model=served, base_url=s.base_url, api_key_env=s.api_key_env,
                                       concurrency=s.concurrency)
    from m3po_core.sampling.transformers_backend import TransformersSampler

    return TransformersSampler(*_eval_model(cfg, store, model_ref, which))


def _eval_model(cfg: RunConfig, store: RunStore, model_ref: str, which: str):
    if which == "base":
        return get_vlm(cfg, store, model_ref)
    from peft import PeftModel

    from m3po_core.models import load_vlm

    model, processor = load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype)
    model = PeftModel.from_pretrained(model, store.local_dir("adapter")).merge_and_unload()
    model.eval()
    return model, processor
