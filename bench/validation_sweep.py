"""How the demo's training settings were chosen: sweep them on the *validation* split.

    python bench/validation_sweep.py --root ./m3po-runs --run-id demo \
        --try learning_rate=1e-3 --try learning_rate=1e-3,loss_type=[sigmoid,sft],loss_weights=[1,1]

    python bench/validation_sweep.py --run-id graded --config configs/graded.yaml \
        --selection logp=logp_sum --try learning_rate=1e-3

    python bench/validation_sweep.py --run-id graded --config configs/graded.yaml \
        --pair-kinds short --pair-kinds open --try learning_rate=1e-3

--pair-kinds trains each setting once more on a subset of the pairs: those of the prompts of some
instruction kinds (`short`: every short kind, `open`: every open kind, or kinds joined by `+`, e.g.
`exist+list`; a leading `-` keeps the pairs of every other kind). It says which pairs move which skill.

Trains a LoRA-DPO adapter on the run's pairs.parquet (with --selection, on pairs selected again
from the run's candidates and scores with those selection.* settings, kept in the run's
`cells/val-...` folder) for each setting and prints POPE- and
MME-style scores and CHAIR_s on held-out *validation* scenes (split "val"), never the evaluation
split that the report uses. Prints measured figures only.
"""
import argparse
import dataclasses
import tempfile


from m3po_core import models
from m3po_core.config import ConfigError, config_from_dict, load_config, parse_override
from m3po_core.data.images import load_image
from m3po_core.data import synthetic as world
from m3po_core.data.synthetic_benchmarks import chair_prompts, mme_questions, pope_questions
from m3po_core.evaluation import chair, mme, pope
from m3po_core.sampling import greedy_batched
from m3po_core.sampling.transformers_backend import TransformersSampler
from m3po_core.store import RunStore
from m3po_core.training import pairs_dataset, train_lora_dpo


def val_benchmarks(cfg, n_scenes=200):
    bias = world.WorldBias.of(cfg.data.world)
    sft = world.make_scenes(cfg.seed, "sft", cfg.data.world.n_sft_scenes, bias)
    val = world.make_scenes(cfg.seed, "val", n_scenes, bias)
    images = {s.scene_id: world.render(s, cfg.data.world.image_size) for s in val}
    return images, {"pope": pope_questions(val, cfg.seed + 1, sft, bias), "mme": mme_questions(val, cfg.seed + 1, bias),
                    "chair": chair_prompts(val)}


def score(model, processor, images, benches, max_new_tokens, open_max_new_tokens=None):
    sampler = TransformersSampler(model, processor)
    out = {}
    for name, qs in benches.items():
        preds = greedy_batched(sampler, [images[q["scene_id"]] for q in qs], [q["instruction"] for q in qs],
                               (open_max_new_tokens or max_new_tokens) if name == "chair" else max_new_tokens,
                               batch_size=64)
        recs = [{**q, "prediction": p} for q, p in zip(qs, preds)]
        if name == "chair":
            out["chair_s"] = chair.score(recs)["chair_s"]
        elif name == "pope":
            m = pope.score(recs)
            out["pope"], out["f1"], out["yes_ratio"] = m["accuracy"], m["f1"], m["yes_ratio"]
        else:
            m = mme.score(recs)
            out["mme"] = m["score"]
            out["mme_sub"] = " ".join(f"{c[:5]}={v['score']:.0f}" for c, v in sorted(m["categories"].items()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="./m3po-runs")
    ap.add_argument("--run-id", default="demo")
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a configuration override, as `m3po run --set` takes (repeatable): the run's own")
    ap.add_argument("--selection", default="", help="comma-separated selection.* overrides, e.g. logp=logp_sum")
    ap.add_argument("--pair-kinds", action="append", default=[],
                    help="also train on the pairs of these instruction kinds only: short, open, kind+kind, -kind")
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help="comma-separated training.* overrides, e.g. learning_rate=1e-3,beta=0.2")
    args = ap.parse_args()
    for spec in args.pair_kinds:  # named before anything loads
        try:
            pair_kinds(spec)
        except ValueError as e:
            ap.error(f"--pair-kinds: {e}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.error(str(e))
    if cfg.data.source != "synthetic":
        ap.error(f"data.source is {cfg.data.source!r}: the validation split is the synthetic world's")
    store = RunStore(args.root, args.run_id)
    if not store.exists("pairs.parquet"):
        ap.error(f"{store.path('pairs.parquet')} does not exist: run `m3po run` for this run id first")
    from m3po_core.stages.base_models import ensure_base_model

    model_ref = f"{args.root}/{ensure_base_model(cfg, store).split(':', 1)[1]}"  # the run's own base
    if args.selection:
        from m3po_core.stages.select import select
        from m3po_core.store import CellStore

        bad = [item for item in args.selection.split(",") if "=" not in item]
        if bad:
            ap.error(f"--selection: {bad[0]!r} is not KEY=VALUE (a selection.* key, e.g. logp=logp_sum)")
        chosen = dict(item.split("=", 1) for item in args.selection.split(","))
        try:
            cfg = config_from_dict({**cfg.to_dict(), "selection": {**dataclasses.asdict(cfg.selection),
                                                                    **{k: parse_override(f"{k}={v}")[1] for k, v in chosen.items()}}})
        except ConfigError as e:  # names the key: unknown, or a value its type refuses
            ap.error(f"--selection: {e}")
        cell = CellStore(store, "val-" + "-".join(f"{k}-{v}" for k, v in chosen.items()))
        stats = select(cfg, cell, len(store.manifest("candidates")))
        print(f"selection {args.selection}: {stats['pairs']} pairs; rejected differs from alpha = 0's in "
              f"{stats['diagnostics']['share_rejected_differs_from_alpha0']:.1%} of the prompts")
        store = cell
    pairs = store.read_table("pairs.parquet").to_pylist()
    decoded = {id(p): load_image(p["image"], "pairs.parquet") for p in pairs}  # once; the subsets hold these rows
    subsets = pair_subsets(RunStore(args.root, args.run_id), pairs, args.pair_kinds)
    images, benches = val_benchmarks(cfg)
    lengths = cfg.evaluation.max_new_tokens, cfg.evaluation.open_max_new_tokens
    base = score(*models.load_vlm(model_ref), images, benches, *lengths)
    print(f"{'setting':<60} {'POPE acc':>8} {'F1':>5} {'yes':>5} {'MME':>6} {'CHAIR_s':>7}  MME subtasks (validation split)")
    print(f"{'base model':<60} {base['pope']:>8.3f} {base['f1']:>5.3f} {base['yes_ratio']:>5.2f} {base['mme']:>6.1f} {base['chair_s']:>7.3f}  "
          f"{base['mme_sub']}")
    for spec, subset in ((spec, subset) for spec in args.tries for subset in subsets):
        overrides = {}
        for item in spec.split(",") if "[" not in spec else split_overrides(spec):
            k, v = parse_override(item)
            overrides[k] = v
        tcfg = config_from_dict({**cfg.to_dict(), "training": {**dataclasses.asdict(cfg.training), **overrides}})
        model, processor = models.load_vlm(model_ref)
        chosen_pairs = subsets[subset]
        with tempfile.TemporaryDirectory() as d:
            train_lora_dpo(model, processor, pairs_dataset([decoded[id(p)] for p in chosen_pairs],
                                                           [p["instruction"] for p in chosen_pairs], chosen_pairs),
                           tcfg.training, d)
        model.eval()  # PEFT injected the trained adapters into `model` itself
        got = score(model, processor, images, benches, *lengths)
        label = spec if len(subsets) == 1 else f"{spec} [{subset}: {len(chosen_pairs)}]"
        print(f"{label:<60} {got['pope']:>8.3f} {got['f1']:>5.3f} {got['yes_ratio']:>5.2f} {got['mme']:>6.1f} {got['chair_s']:>7.3f}  "
              f"{got['mme_sub']}", flush=True)


def pair_kinds(spec: str) -> set[str]:
    """The instruction kinds a --pair-kinds value names (see the module docstring)."""
    every = set(world.KINDS) | set(world.OPEN_KINDS)
    named = spec.lstrip("-").split("+")
    groups = {"short": set(world.KINDS), "open": set(world.OPEN_KINDS)}
    unknown = [k for k in named if k not in every and k not in groups]
    if unknown:
        raise ValueError(f"unknown instruction kind {unknown[0]!r} in {spec!r}; expected short, open or some of "
                         f"{sorted(every)}")
    kinds = set().union(*(groups.get(k, {k}) for k in named))
    return every - kinds if spec.startswith("-") else kinds


def pair_subsets(run: RunStore, pairs: list[dict], specs: list[str]) -> dict[str, list[dict]]:
    """{"all pairs": pairs, spec: the pairs of the prompts whose kind `spec` names, ...}; the kinds are
    read from the run's prompts stage."""
    if not specs:
        return {"all pairs": pairs}
    kinds = {spec: pair_kinds(spec) for spec in specs}
    prompts = run.read_stage("prompts").select(["prompt_id", "kind"]).to_pydict()
    kind_of = dict(zip(prompts["prompt_id"], prompts["kind"]))
    return {"all pairs": pairs, **{spec: [p for p in pairs if kind_of[p["prompt_id"]] in kinds[spec]] for spec in specs}}


def split_overrides(spec):
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


if __name__ == "__main__":
    main()
