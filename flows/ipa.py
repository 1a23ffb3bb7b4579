"""The IPA DAG (m3po_core/ipa.py) on the same store, shards, training and evaluation as M3PO:

    prompts, base model
      -> round r = 1..R:  [generator: DPO on rounds < r (self-evolution)] -> the round's prompts
                          (round 1: all; then the unresolved) -> sample + revise + verify per shard
                          (fan-out) -> pairs, unresolved
      -> all rounds' pairs -> train (LoRA-DPO) -> evaluate (base vs trained) -> report
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from m3po_core.config import RunConfig, check_ipa, load_config, validate
from m3po_core.store import RunStore
from m3po.flows import stage_flows
from m3po.flows.machinery.epilogue import StageClock, report, start_run
from m3po_core.run_summary import run_info
from m3po.flows.machinery.fan_out import fan_out
from m3po.tasks import ipa_tasks, stage_tasks


@flow(name="ipa-rounds", flow_run_name="ipa-rounds-{run_id}")
def ipa_rounds(config: RunConfig, root: str, run_id: str) -> dict[str, Any]:
    """Prompts and base model, then IPA's rounds; ends with pairs.parquet."""
    cfg, store = stage_flows.open_run(config, root, run_id)
    n_shards = stage_tasks.prepare_prompts(cfg, store)
    model_ref = stage_tasks.ensure_base_model(cfg, store)
    return {"n_shards": n_shards, "model_ref": model_ref, **collect_pairs(cfg, store, n_shards, model_ref)}


def collect_pairs(cfg, store: RunStore, n_shards: int, model_ref: str) -> dict[str, Any]:
    """IPA's rounds on a run's prompts (any store: a run, or an experiment cell sharing its prompts).
    Each round's tasks wait for the previous round's pairs, so the run graph shows the rounds in order."""
    check_ipa(cfg)
    rounds_run, computed, previous = 0, 0, []
    for r in range(1, cfg.ipa.rounds + 1):
        n_round = ipa_tasks.prepare_round.submit(cfg, store, r, n_shards, wait_for=previous)
        if n_round.result() == 0:  # every prompt resolved
            break
        generator_rel = ipa_tasks.generator.submit(cfg, store, model_ref, r, wait_for=previous)
        results = fan_out(ipa_tasks.ipa_shard, cfg, store, n_round.result(), model_ref, f"ipa-round-{r}",
                          ref_name="model_ref", extra={"r": r, "generator_rel": generator_rel.result()},
                          wait_for=[n_round, generator_rel])
        computed += sum(not x.cached for x in results)
        previous = [ipa_tasks.collect_round.submit(cfg, store, r, n_round.result(), model_ref, wait_for=[n_round])]
        previous[0].result()  # raises if the round's pairs could not be collected
        rounds_run = r
    stats = ipa_tasks.finalize(cfg, store, rounds_run, wait_for=previous)
    return {"pairs": stats, "computed": computed}


@flow(name="ipa-pipeline", flow_run_name="ipa-{run_id}")
def ipa_pipeline(config: RunConfig | None = None, root: str = "./m3po-runs", run_id: str = "demo-ipa",
                 config_file: str | None = None) -> dict[str, Any]:
    """IPA end to end; `config` or `config_file` as for the M3PO pipeline."""
    cfg = validate(config) if config is not None else load_config(config_file)
    store = RunStore(root, run_id)
    start_run(cfg, store, "ipa", "method:ipa")
    clock = StageClock()

    rounds = clock("ipa rounds", ipa_rounds, cfg, root, run_id)
    trained = clock("train", stage_tasks.train, cfg, store, rounds["model_ref"], wait_for=[rounds])
    metrics = clock("evaluate", stage_tasks.evaluate, cfg, store, rounds["model_ref"], wait_for=[trained])

    info = run_info(store, clock.timings, {"ipa": rounds["computed"]})
    url = report(cfg, store, "ipa", rounds["n_shards"], info, ("rounds", rounds["pairs"]["ipa_rounds"], "IPA rounds"),
                 wait_for=[metrics])
    return {"metrics": {k: metrics.get(k) for k in ("base", "trained", "intervals")}, "pairs": rounds["pairs"],
            "info": info, "report": url}
