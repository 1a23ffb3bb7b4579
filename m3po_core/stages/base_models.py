"""DAG step 2, the models a run builds for itself: the tiny LLaVA base policy (warm-started on the
synthetic world) and the tiny CLIP encoder. Any other model name is used as given.

    {root}/_models/tiny-llava-{key}/, {root}/_models/tiny-clip-{key}/   shared by every run under the root

Limit: a model built here (no carried copy for the configuration) is trained from scratch in this
process, so it depends on the device's floating-point path; the carried ones (stages/carried.py) do not.
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


def ensure_base_model(cfg: RunConfig, store: RunStore, log_fn: Callable[[str], None] = log.info,
                      use_carried: bool = True) -> str:
    """A reference to the base policy: a hub name/path as given, or the tiny LLaVA kept under
    `{root}/_models/` so later runs reuse it: the repository's carried copy when it has one for
    this configuration (stages/carried.py), else built and warm-started here."""
    from m3po_core import models

    if cfg.model.name != models.TINY_NAME:
        return cfg.model.name
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    vocabulary = base_vocabulary(cfg)
    key = stage_key(cfg, "base_model", vocabulary)
    rel = f"_models/tiny-llava-{key}"
    if not store.dir_complete(rel, shared=True) and not (use_carried and _copy_carried(store, rel, log_fn)):
        w, m = cfg.data.world, cfg.model
        log_fn(f"no carried base for this configuration: warm-starting {rel} here (its result depends on "
               "this machine's floating-point path)")
        model, processor = models.build_tiny_llava(vocabulary, seed=m.seed)
        model.to(models.pick_device(m.device))
        bias = world.WorldBias.of(w)
        scenes = world.make_scenes(cfg.seed, "sft", w.n_sft_scenes, bias)
        # four short questions a scene and, in a world with open kinds, one open one: the short skills get
        # the warm start they have in the demo, and the open answers stay unsure enough for samples to differ
        rows = synthetic_prompts.make_prompts(scenes, cfg.seed, per_scene=4, bias=bias,
                                              open_per_scene=min(1, w.open_per_scene), explain=w.explain)
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


def base_vocabulary(cfg: RunConfig) -> list[str]:
    """The tiny base's words: the world's, with those of the kinds of answer its configuration asks for."""
    from m3po_core.data import synthetic as world

    return world.vocabulary(open_kinds=cfg.data.world.open_per_scene > 0, explain=cfg.data.world.explain)


def _measure_base_accuracy(cfg: RunConfig, model, processor) -> dict[str, float]:
    """Greedy answers on a validation split (never the evaluation split) scored by the reference judge."""
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts
    from m3po_core.sampling import greedy_batched
    from m3po_core.sampling.transformers_backend import TransformersSampler
    from m3po_core.scoring.judge import JudgeItem, ReferenceJudge

    scenes = world.make_scenes(cfg.seed, "val", 48, world.WorldBias.of(cfg.data.world))
    # true answers: val measures, it does not teach
    rows = synthetic_prompts.make_prompts(scenes, cfg.seed, per_scene=4, open_per_scene=cfg.data.world.open_per_scene,
                                          explain=cfg.data.world.explain)
    imgs = {s.scene_id: world.render(s, cfg.data.world.image_size) for s in scenes}
    answers = greedy_batched(TransformersSampler(model, processor), [imgs[r["scene_id"]] for r in rows],
                             [r["instruction"] for r in rows], max_new_tokens=32, batch_size=64)
    items = [JudgeItem(r["prompt_id"], r["instruction"], a, meta={"scene": r["scene"], "kind": r["kind"],
                                                                  "reference": r["reference"]})
             for r, a in zip(rows, answers)]
    acc = np.array([s.accuracy for s in ReferenceJudge().score(items)])
    yes_no = np.array([r["kind"] in ("exist", "colour_check", "count_check", "position_check") for r in rows])
    return {"accuracy": float(acc.mean()), "yes_no_accuracy": float(acc[yes_no].mean()), "n_val": len(rows)}


def _copy_carried(store: RunStore, rel: str, log_fn: Callable[[str], None]) -> bool:
    """Put the repository's carried copy of `rel` into the store (after its checksums); False if none."""
    from m3po_core.stages.carried import carried

    source = carried(rel)
    if source is None:
        return False
    store.put_dir(source, rel, shared=True)
    log_fn(f"{rel}: the repository's carried copy ({source}, SHA-256 verified)")
    return True


def ensure_clip(cfg: RunConfig, store: RunStore, log_fn: Callable[[str], None] = log.info,
                use_carried: bool = True) -> str:
    """A reference to the CLIP encoder: for `m3po-tiny-clip` the carried copy or one trained here,
    else the open_clip name."""
    c = cfg.scoring.clip
    if c.name != "m3po-tiny-clip":
        return c.name
    from m3po_core.data import synthetic as world
    from m3po_core.scoring.clip import train_tiny_clip

    key = stage_key(cfg, "clip")
    rel = f"_models/tiny-clip-{key}"
    if not store.dir_complete(rel, shared=True) and not (use_carried and _copy_carried(store, rel, log_fn)):
        w = cfg.data.world
        scenes = world.make_scenes(cfg.seed, "sft", w.n_sft_scenes, world.WorldBias.of(w))
        val = world.make_scenes(cfg.seed, "val", 128, world.WorldBias.of(w))
        captions, negatives = _clip_captions(scenes, cfg.seed, c.hard_negatives)
        val_captions, val_negatives = _clip_captions(val, cfg.seed, c.hard_negatives)
        with device_slot():
            scorer, metrics = train_tiny_clip(
                [world.render(s, w.image_size) for s in scenes], captions, negatives=negatives,
                steps=c.train_steps, batch_size=c.train_batch_size, seed=cfg.seed,
                heldout_images=[world.render(s, w.image_size) for s in val],
                heldout_captions=val_captions, heldout_negatives=val_negatives, log=log_fn)
        log_fn(f"tiny CLIP: held-out retrieval top-1 {metrics['retrieval_top1']:.2f} "
               f"(chance {metrics['retrieval_chance']:.2f})")
        with tempfile.TemporaryDirectory() as tmp:
            scorer.save(tmp)
            store.put_dir(tmp, rel, shared=True)
    return STORE_REF + rel


def _clip_captions(scenes, seed: int, hard_negatives: int) -> tuple[list[str], list[list[str]] | None]:
    """The tiny CLIP's captions: without hard negatives the canonical caption (as before the setting);
    with them, each scene's objects listed in any order ("a red circle and a blue square ."), and
    `hard_negatives` wrong lists of it (data/wrong_answers.py). Lists, since the tiny CLIP reads 30
    tokens and a detailed description of four objects is 35: it learns which objects are there,
    not where."""
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts
    from m3po_core.data.wrong_answers import wrong_descriptions

    if not hard_negatives:
        return [world.caption(s) for s in scenes], None
    captions, negatives = [], []
    for s in scenes:
        rng = world.seeded_rng(seed, "clip-captions", s.scene_id)
        captions.append(synthetic_prompts.open_reference(s, "list", rng))
        negatives.append(wrong_descriptions(s, "list", rng, hard_negatives))
    return captions, negatives
