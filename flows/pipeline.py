"""The M3PO DAG, end to end:

    generate (prompts, base model, sample shards) -> score (CLIP, judge, MAS per shard)
      -> select (M3P-Score pairs) -> train (LoRA-DPO) -> evaluate (base vs trained) -> report

Generate and score are subflows (each fans its shards out); select, train and evaluate are tasks of
this flow run (each a plain function of m3po_core/stages/ behind its task in tasks/stage_tasks.py).
Each stage waits for its upstream stage's result explicitly (`wait_for`), so the run graph in the
Prefect UI draws these edges even where a stage needs only a count or a reference from it.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from m3po_core.config import RunConfig, load_config, validate
from m3po_core.store import RunStore
from m3po.flows import stage_flows
from m3po.tasks import stage_tasks as st
from m3po.flows.machinery.epilogue import StageClock, report, start_run
from m3po_core.run_summary import model_quality, run_info


@flow(name="m3po-pipeline", flow_run_name="m3po-{run_id}")
def m3po_pipeline(config: RunConfig | None = None, root: str = "./m3po-runs", run_id: str = "demo",
                  config_file: str | None = None) -> dict[str, Any]:
    """`config` (the run configuration, parsed once: `m3po run` passes the one it loaded) or
    `config_file` (a YAML path on the worker; default configs/demo.yaml): deployments and schedules
    pass a file. Every stage gets this one object."""
    cfg = validate(config) if config is not None else load_config(config_file)
    store = RunStore(root, run_id)
    start_run(cfg, store, "m3po", f"strategy:{cfg.selection.strategy}")
    clock = StageClock()

    gen = clock("generate", stage_flows.generate, cfg, root, run_id)
    scored = clock("score", stage_flows.score, cfg, root, run_id, gen["n_shards"], wait_for=[gen])
    pairs = clock("select", st.select_pairs, cfg, store, gen["n_shards"], wait_for=[scored])
    trained = clock("train", st.train, cfg, store, gen["model_ref"], wait_for=[pairs])
    metrics = clock("evaluate", st.evaluate, cfg, store, gen["model_ref"], wait_for=[trained])

    info = run_info(store, clock.timings, {"candidates": gen["computed"], "scores": scored["computed"]})
    info.update(model_quality(store, gen["model_ref"], scored["clip_ref"]))
    url = report(cfg, store, "m3po", gen["n_shards"], info, ("pairs", [pairs], "pair selection statistics"),
                 wait_for=[metrics])
    return {"metrics": {k: metrics.get(k) for k in ("base", "trained", "intervals")}, "pairs": pairs, "info": info,
            "report": url}
