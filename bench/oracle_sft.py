"""What the true answers of a run's prompts teach by SFT: a reference for its training, on the validation split.

    python bench/oracle_sft.py --root ./m3po-runs --run-id demo --seeds 0,1
    python bench/oracle_sft.py --run-id graded --config configs/graded.yaml --try learning_rate=3e-4

Fine-tunes the run's base on the *true* answers of the prompts its pairs.parquet holds (the scene
graph's answers, none of the instruction data's bias), with the SFT loss alone, and prints POPE, MME
and CHAIR_s on held-out validation scenes beside the base's. A reference for the run's training, not
a bound: it says what learning the right answers to these prompts gives, so a trained model near it
has learned what the prompts hold and one above it gained from the rejected side of its pairs or
from training on its own samples (measured: in the graded world the model's own chosen answers train
better than the true ones, docs/demo.md). Limit: the synthetic world only (the true answers come
from its scene graphs); the run's own training settings, one run per seed (--try overrides them, as
in bench/validation_sweep.py).
"""
import argparse
import dataclasses
import tempfile

from validation_sweep import score, split_overrides, val_benchmarks

from m3po_core import models
from m3po_core.config import ConfigError, config_from_dict, load_config, parse_override
from m3po_core.data import synthetic as world
from m3po_core.data.images import load_image
from m3po_core.stages.base_models import ensure_base_model
from m3po_core.store import RunStore
from m3po_core.training import pairs_dataset, train_lora_dpo


def oracle_pairs(run: RunStore, tokenizer) -> list[dict]:
    """The run's pairs with the chosen answer replaced by the scene graph's true answer (and its tokens)."""
    prompts = {r["prompt_id"]: r for r in run.read_stage("prompts", None).to_pylist()}
    pairs = run.read_table("pairs.parquet").to_pylist()
    for p in pairs:
        q = prompts[p["prompt_id"]]
        kind, params = world.parse_instruction(q["instruction"])
        true_answer = world.explained_answer if world.explains(kind, q["reference"]) else world.answer_text
        truth = true_answer(world.Scene.from_json(q["scene"]), kind, params)
        p["chosen"] = truth
        p["chosen_token_ids"] = tokenizer(truth, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return pairs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="./m3po-runs")
    ap.add_argument("--run-id", default="demo")
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a configuration override, as `m3po run --set` takes (repeatable): the run's own")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    ap.add_argument("--try", dest="spec", default="", help="training.* overrides, e.g. learning_rate=3e-4,epochs=1")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.error(str(e))
    if cfg.data.source != "synthetic":
        ap.error(f"data.source is {cfg.data.source!r}: the true answers come from the synthetic world's scene graphs")
    run = RunStore(args.root, args.run_id)
    if not run.exists("pairs.parquet"):
        ap.error(f"{run.path('pairs.parquet')} does not exist: run `m3po run` for this run id first")
    model_ref = f"{args.root}/{ensure_base_model(cfg, run).split(':', 1)[1]}"
    overrides = dict(parse_override(item) for item in split_overrides(args.spec)) if args.spec else {}
    model, processor = models.load_vlm(model_ref)
    pairs = oracle_pairs(run, processor.tokenizer)
    images = [load_image(p["image"], "pairs.parquet") for p in pairs]
    val_images, benches = val_benchmarks(cfg)
    lengths = cfg.evaluation.max_new_tokens, cfg.evaluation.open_max_new_tokens
    base = score(model, processor, val_images, benches, *lengths)
    print(f"{args.run_id}: {len(pairs)} prompts with pairs; SFT on their true answers ({args.spec or 'the run settings'})")
    print(f"{'model':<24} {'POPE acc':>8} {'F1':>5} {'yes':>5} {'MME':>6} {'CHAIR_s':>7}  MME subtasks (validation split)")
    rows = [("base model", base)]
    for seed in [int(s) for s in args.seeds.split(",")]:
        training = {**dataclasses.asdict(cfg.training), **overrides, "seed": seed,
                    "loss_type": ["sft"], "loss_weights": None}
        tcfg = config_from_dict({**cfg.to_dict(), "training": training})
        model, processor = models.load_vlm(model_ref)
        with tempfile.TemporaryDirectory() as d:
            train_lora_dpo(model, processor, pairs_dataset(images, [p["instruction"] for p in pairs], pairs),
                           tcfg.training, d)
        model.eval()  # PEFT injected the trained adapters into `model` itself
        rows.append((f"oracle SFT, seed {seed}", score(model, processor, val_images, benches, *lengths)))
    for label, got in rows:
        print(f"{label:<24} {got['pope']:>8.3f} {got['f1']:>5.3f} {got['yes_ratio']:>5.2f} {got['mme']:>6.1f} "
              f"{got['chair_s']:>7.3f}  {got['mme_sub']}", flush=True)


if __name__ == "__main__":
    main()
