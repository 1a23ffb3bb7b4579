"""The paper's tables from one run's samples:

    generate -> score                      (once: the run's cached candidates and scores)
      -> base model on the benchmarks      (once)
      -> for each cell (recipe or sweep point, seed): select -> train -> evaluate
      -> results.parquet, tables.md, sweep plots, artifacts
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from m3po_core import experiment as ex
from m3po_core.selection_diagnostics import diagnostics_table
from m3po_core.config import RunConfig, load_config, validate
from m3po_core.store import CellStore, RunStore
from m3po.flows import stage_flows
from m3po.flows.machinery.epilogue import StageClock, tag_flow_run
from m3po.tasks import stage_tasks as st


@flow(name="m3po-experiment-cell", flow_run_name="cell-{cell_id}")
def run_cell(config: RunConfig, root: str, run_id: str, cell_id: str, n_shards: int,
             model_ref: str, method: str = "m3po") -> dict[str, Any]:
    """One cell: M3PO's selection (or IPA's rounds, on the same prompts) -> train -> evaluate."""
    cfg = config
    store = CellStore(RunStore(root, run_id), cell_id)
    if method == "ipa":
        from m3po.flows.ipa import collect_pairs

        pair_stats = collect_pairs(cfg, store, n_shards, model_ref)["pairs"]
    else:
        pair_stats = st.select_pairs(cfg, store, n_shards)
    train_log = st.train(cfg, store, model_ref, wait_for=[pair_stats])
    metrics = st.evaluate(cfg, store, model_ref, wait_for=[train_log])
    return {"pairs": pair_stats, "metrics": metrics["trained"], "train_seconds": train_log["seconds"]}


@flow(name="m3po-experiment", flow_run_name="experiment-{run_id}")
def m3po_experiment(config: RunConfig | None = None, root: str = "./m3po-runs", run_id: str = "experiment",
                    recipes: list[str] = ("base", "sft", "dpo", "rm_dpo", "m3po", "m3po_alpha0", "ipa"),
                    seeds: list[int] = (0, 1, 2), alphas: list[float] = (), deltas: list[float] = (),
                    config_file: str | None = None) -> dict[str, Any]:
    cfg = validate(config) if config is not None else load_config(config_file)
    recipes, seeds, alphas, deltas = list(recipes), list(seeds), list(alphas), list(deltas)
    cells = ex.grid(recipes, seeds, alphas, deltas)
    store = RunStore(root, run_id)
    store.write_json("config.json", cfg.to_dict())
    store.write_json("experiment.json", {"recipes": recipes, "seeds": seeds, "alphas": alphas, "deltas": deltas})
    tag_flow_run(f"run:{run_id}", f"config:{cfg.name}", "experiment")
    logger = get_run_logger()
    t0 = time.time()

    clock = StageClock()
    gen = clock("generate", stage_flows.generate, cfg, root, run_id)
    scored = clock("score", stage_flows.score, cfg, root, run_id, gen["n_shards"], wait_for=[gen])
    base = clock("base", st.evaluate_base, cfg, store, gen["model_ref"])
    rows = ex.result_rows(None, base["metrics"], None)
    progress = create_progress_artifact(0.0, key=f"{run_id}-cells-progress".lower().replace("_", "-"),
                                        description="experiment cells finished")
    diagnostics = {}  # seed -> M3PO's selection diagnostics (m3po_core/selection_diagnostics.py)
    for i, cell in enumerate(cells, start=1):
        out = clock(f"cell {i}/{len(cells)} {cell.cell_id}", run_cell, ex.cell_config(cfg, cell), root,
                    run_id, cell.cell_id, gen["n_shards"], gen["model_ref"],
                    method="ipa" if cell.recipe == "ipa" else "m3po", wait_for=[scored])
        rows += ex.result_rows(cell, out["metrics"], out["pairs"])
        if cell.recipe == "m3po" and cell.alpha is None and cell.delta is None:
            diagnostics[cell.seed] = (out["pairs"] or {}).get("diagnostics")
        update_progress_artifact(progress, 100.0 * i / len(cells))
        logger.info(f"cell {i}/{len(cells)} {cell.cell_id}: " + ", ".join(
            f"{r['metric']} {r['value']:.3f}" for r in rows if r["cell_id"] == cell.cell_id))

    store.write_table("experiment/results.parquet", pa.Table.from_pylist(rows))
    paired = ex.paired_rows(cells, lambda cell_id, bench: ex.cell_answers(cfg, store, cell_id, bench))
    if paired:
        store.write_table("experiment/comparisons.parquet", pa.Table.from_pylist(paired))
    markdown = "\n".join([f"# M3PO experiment `{run_id}`", "", ex.tables(rows, recipes, alphas, deltas, len(seeds)),
                          *diagnostics_table(diagnostics),
                          "### Does M3PO beat the others?", "",
                          "Paired bootstrap over the benchmark's questions, M3PO's answers against the other's "
                          "on the same questions, per seed; a verdict only where every seed's interval excludes "
                          "zero (m3po_core/evaluation/paired.py).", "",
                          *ex.verdicts(rows, recipes, paired), "",
                          *[f"![{p}]({p})" for p in ex.sweep_plots(store, rows, alphas, deltas)], "",
                          f"{len(cells)} cells in {time.time() - t0:.0f} s; nothing was tuned on the evaluation "
                          "split (the configs' training settings were chosen on their validation split, bench/validation_sweep.py)."])
    store.write_bytes("experiment/tables.md", markdown.encode())
    create_markdown_artifact(markdown, key=f"{run_id}-experiment".lower().replace("_", "-"),
                             description="M3PO experiment tables")
    logger.info(f"tables: {store.url('experiment/tables.md')}")
    return {"rows": rows, "tables": store.url("experiment/tables.md"), "markdown": markdown}
