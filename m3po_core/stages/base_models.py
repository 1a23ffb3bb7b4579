"""DAG step 2, the models a run builds for itself: the tiny LLaVA base policy (warm-started on the
synthetic world) and the tiny CLIP encoder. Any other model name is used as given.

    {root}/_models/tiny-llava-{key}/, {root}/_models/tiny-clip-{key}/   shared by every run under the root

Limit: the warm start runs in this process on its device; its result depends on that device's
floating-point path (it is trained from scratch).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Callable

import numpy as np

from m3po_core.components import STORE_REF
from m3po_core.config import RunConfig
from m3po_core.stages.runner import device_slot, stage_key
from m3po_core.store import RunStore

log = logging.getLogger("m3po.stages")


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
