"""DAG step 7, evaluate: greedy answers of the base model and of base + adapter on the held-out
benchmarks (POPE, MME, IFT, the judge-simulated preference test), scored.

    metrics.json                                    both models' metrics, under the stage's key
    eval/base_metrics.json, eval/predictions-base-*  the base model's side, shared by every run and cell
    predictions/predictions-trained-*/shard-*.parquet, predictions/ratings-trained-*.parquet

Predictions are cached per shard of questions (an interrupted evaluation resumes); the model is
loaded only if a shard needs computing. Limit: each benchmark's predictions are read whole to score.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import pyarrow as pa
from PIL import Image

from m3po_core import components, schema
from m3po_core.config import RunConfig
from m3po_core.data.images import load_image
from m3po_core.stages.benchmarks import benchmark_questions, public_sources
from m3po_core.stages.runner import device_slot, done_record, fingerprint, run_shard, stage_key
from m3po_core.store import RunStore, retry_unrated

log = logging.getLogger("m3po.stages")


def evaluate(cfg: RunConfig, store: RunStore, model_ref: str, log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Greedy answers of the base model and of base + adapter on the held-out benchmarks; metrics.json.
    The base model's side is cached beside the benchmarks (`eval/base_metrics.json`): every run and
    every experiment cell on the same prompts and base model shares it."""
    train_key = store.read_json("train_log.json")["key"]
    key = stage_key(cfg, "evaluate", train_key, model_ref, public_sources(cfg))
    record = trained_under_its_name(done_record(store, "metrics.json", key))
    if not (attempt := _rating_attempt(record, "base", "trained")):
        # metrics written before intervals or harness rules were: add them from the cached predictions
        changed = [_add_every_rule(cfg, store, record[side], side) for side in ("base", "trained")]
        if "intervals" not in record:
            record["intervals"] = base_vs_trained_intervals(cfg, store)
            changed.append(True)
        if any(changed):
            store.write_json("metrics.json", record)
        return record
    base = evaluate_base(cfg, store, model_ref, log_fn)
    adapter = components.Adapter("adapter", train_key, label="m3po", served_name=cfg.evaluation.served_adapter)
    trained = _evaluate_model(cfg, store, model_ref, "trained", "predictions", log_fn, weights_key=train_key,
                              adapter=adapter)
    if "preference" in trained:  # pairwise against the base model's responses to the same prompts
        from m3po_core.evaluation import preference

        overall = lambda rel: dict(zip(*(store.read_table(rel).column(c).to_pylist() for c in ("question_id", "overall"))))
        trained["preference"].update(preference.win_rate(overall("predictions/ratings-trained-preference.parquet"),
                                                         overall("eval/ratings-base-preference.parquet")))
        log_fn(f"trained preference: win rate vs base {trained['preference']['win_rate']:.3f}")
    metrics = {"key": key, "base": base["metrics"], "trained": trained, "attempts": attempt,
               "intervals": base_vs_trained_intervals(cfg, store)}
    store.write_json("metrics.json", metrics)
    return metrics


def base_vs_trained_intervals(cfg: RunConfig, store: RunStore) -> dict[str, Any]:
    """Paired bootstrap 95 % intervals of trained - base over the benchmark's questions (POPE accuracy
    and F1, MME score, CHAIR_s, CHAIR_i and recall; m3po_core/evaluation/paired.py), from both models' cached predictions."""
    from m3po_core.evaluation import paired

    out: dict[str, Any] = {}
    for bench in paired.BENCHMARKS:
        if bench not in cfg.evaluation.benchmarks:
            continue
        base, trained = (predictions(cfg, store, bench, model) for model in ("base", "trained"))
        out[bench] = paired.intervals(bench, base, trained, seed=cfg.seed)
    return out


def predictions(cfg: RunConfig, store: RunStore, bench: str, model: str = "trained") -> list[dict[str, Any]]:
    """One model's cached answers to a benchmark (`model`: "base" or "trained"; a cell's store gives
    that cell's trained model)."""
    n_shards = -(-len(benchmark_questions(cfg, store, bench)) // cfg.evaluation.shard_size)
    folder = "eval" if model == "base" else "predictions"
    return store.read_stage(f"{folder}/predictions-{model}-{bench}", n_shards).to_pylist()


def trained_under_its_name(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metrics with the trained model under "trained": runs written before the key was renamed
    (whatever the method or recipe) have it under "m3po"."""
    if metrics is not None and "trained" not in metrics and "m3po" in metrics:
        metrics = {("trained" if k == "m3po" else k): v for k, v in metrics.items()}
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
    key = stage_key(cfg, "evaluate", "base", model_ref, public_sources(cfg))
    record = done_record(store, "eval/base_metrics.json", key)
    if not (attempt := _rating_attempt(record, "metrics")):
        if _add_every_rule(cfg, store, record["metrics"], "base"):
            store.write_json("eval/base_metrics.json", record)
        return record
    record = {"key": key, "metrics": _evaluate_model(cfg, store, model_ref, "base", "eval", log_fn,
                                                     weights_key=["base", model_ref]), "attempts": attempt}
    store.write_json("eval/base_metrics.json", record)
    return record


def _evaluate_model(cfg: RunConfig, store: RunStore, model_ref: str, model_name: str, folder: str,
                    log_fn: Callable[[str], None], weights_key: Any,
                    adapter: components.Adapter | None = None) -> dict[str, Any]:
    """One model on every configured benchmark. Predictions are cached per shard of questions
    (`{folder}/predictions-{model}-{bench}/shard-*.parquet` with a manifest, like sampling): an
    interrupted evaluation resumes where it stopped, and the model is loaded only if a shard
    needs computing. `weights_key` says which weights answered (base model, or the adapter's run);
    `adapter` is applied to the base model (None: the base model answers), through
    `evaluation.backend` (default: the sampling backend); before it answers anything,
    `m3po_core.evaluation.adapter_check` refuses an adapter that leaves the model unchanged."""
    from m3po_core.evaluation import chair, ift, preference
    from m3po_core.sampling import greedy_batched

    loaded: dict[str, Any] = {}
    backend = cfg.evaluation.backend or cfg.sampling.backend

    def sampler(bench: str, questions: list[dict[str, Any]]):
        """Built when the first shard needs it; the trained model only once its adapter is shown to
        change the model, on the first questions of the benchmark about to be answered."""
        if "sampler" not in loaded:
            built = components.sampler_for(cfg, store, model_ref, adapter, backend=backend)
            if adapter is not None and cfg.evaluation.adapter_check_probes > 0:
                _check_adapter(built, bench, questions[:cfg.evaluation.adapter_check_probes])
            loaded["sampler"] = built
        return loaded["sampler"]

    def _check_adapter(adapted, bench: str, probes: list[dict[str, Any]]) -> None:
        from m3po_core.evaluation.adapter_check import check_adapter_changes_model

        check_adapter_changes_model(
            components.sampler_for(cfg, store, model_ref, None, backend), adapted,
            [image_of(q, bench) for q in probes], [q["instruction"] for q in probes],
            min_change=cfg.evaluation.adapter_check_min_change, backend=backend, adapter_dir=store.url(adapter.rel),
            served_as=getattr(adapted, "model", None) if backend == "openai" else None,
            batch_size=cfg.evaluation.batch_size, log_fn=log_fn)

    images: OrderedDict[str, Image.Image] = OrderedDict()

    def image_of(q: dict[str, Any], bench: str) -> Image.Image:
        # an image's questions sit together (POPE, MME): a small cache reads each once, and memory
        # stays at IMAGE_CACHE decoded images whatever the benchmark's size
        if q["image"] in images:
            images.move_to_end(q["image"])
        else:
            images[q["image"]] = load_image(q["image"], f"{bench} question {q['question_id']}")
            if len(images) > IMAGE_CACHE:
                images.popitem(last=False)
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

            def compute(chunk=chunk, bench=bench, questions=questions) -> pa.Table:
                with device_slot():
                    preds = greedy_batched(sampler(bench, questions), [image_of(q, bench) for q in chunk],
                                           [q["instruction"] for q in chunk], max_new_tokens,
                                           cfg.evaluation.batch_size)
                return pa.Table.from_pylist(
                    [{**{c: q.get(c) for c in schema.PREDICTIONS.names}, "prediction": p, "model": model_name,
                      "benchmark": bench} for q, p in zip(chunk, preds)], schema.PREDICTIONS)

            run_shard(store, stage, n_shards - 1, key, compute, schema.PREDICTIONS)
        records = store.read_stage(stage, n_shards).to_pylist() if n_shards else []
        preds = [r["prediction"] for r in records]
        if bench == "preference":
            metrics[bench] = preference.score(questions, _judge_ratings(cfg, store, bench, questions, image_of, preds,
                                                                        model_name, folder))
        elif bench == "chair":
            metrics[bench] = chair.score(records)
        elif bench == "ift":
            ratings = (_judge_ratings(cfg, store, bench, questions, image_of, preds, model_name, folder)
                       if ift.needs_judge(questions) else None)
            metrics[bench] = ift.score([{**q, "prediction": p} for q, p in zip(questions, preds)], ratings)
        else:
            metrics[bench] = scored_under_every_rule(bench, records)
        log_fn(f"{model_name} {bench}: " + _headline(bench, metrics[bench]))
    return metrics


IMAGE_CACHE = 256  # decoded benchmark images kept at once
OPEN_ENDED = ("ift", "preference", "chair")
YES_NO = ("pope", "mme")  # scored under every public harness's rule (m3po_core/evaluation/harness_rules.py)


def scored_under_every_rule(bench: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The project's own figures, and under "rules" every harness's, from the same predictions."""
    from m3po_core.evaluation import mme, pope

    scorer = {"pope": pope, "mme": mme}[bench]
    return {**scorer.score(records), "rules": scorer.every_rule(records)}


def _add_every_rule(cfg: RunConfig, store: RunStore, side: dict[str, Any], model: str) -> bool:
    """Give one model's yes/no metrics their per-rule figures if they lack them; True if it did."""
    missing = [b for b in YES_NO if b in side and "rules" not in side[b]]
    for bench in missing:
        side[bench] = scored_under_every_rule(bench, predictions(cfg, store, bench, model))
    return bool(missing)  # benchmarks answered at length (evaluation.open_max_new_tokens)


def _judge_ratings(cfg: RunConfig, store: RunStore, bench: str, questions, image_of, preds, model_name: str,
                   folder: str) -> list[Any]:
    """The judge's ratings of one model's responses, kept per question (`{folder}/ratings-{model}-{bench}`)
    for the pairwise comparison and for inspection; None where the judge could not rate."""
    from m3po_core.scoring.judge import JudgeItem

    items = [JudgeItem(q["question_id"], q["instruction"], p, image=image_of(q, bench),
                       meta={"scene": q.get("scene"), "kind": q["category"], "reference": q["answer"]})
             for q, p in zip(questions, preds)]
    ratings = components.judge(cfg, store).score(items)
    store.write_table(f"{folder}/ratings-{model_name}-{bench}.parquet", pa.Table.from_pylist(
        [{"question_id": q["question_id"], "overall": r.overall if r else None,
          "accuracy": r.accuracy if r else None, "relevance": r.relevance if r else None,
          "adherence": r.adherence if r else None} for q, r in zip(questions, ratings)]))
    return ratings


def _headline(bench: str, m: dict[str, Any]) -> str:
    if bench == "ift":
        return (f"prompt accuracy {m['prompt_accuracy']:.3f} constraint accuracy {m['constraint_accuracy']:.3f} "
                f"({m['unrated']} unrated)")
    if bench == "preference":
        return (f"accuracy {m['accuracy']:.2f} relevance {m['relevance']:.2f} helpfulness {m['helpfulness']:.2f} "
                f"(1-5; {m['unrated']} unrated)")
    if bench == "chair":
        return f"CHAIR_s {m['chair_s']:.3f} CHAIR_i {m['chair_i']:.3f} object recall {m['recall']:.3f}"
    if bench == "pope":
        return f"accuracy {m['accuracy']:.3f} f1 {m['f1']:.3f} yes-ratio {m['yes_ratio']:.2f}"
    return f"score {m['score']:.1f}"
