"""`m3po experiment`: the paper's table layouts from a grid of cells over one run's samples."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3po_core import experiment as ex
from m3po_core.config import load_config
from m3po_core.store import CellStore, RunStore

TINY = Path(__file__).parent / "tiny.yaml"


def _rows(recipe, values, metric="POPE acc", seeds=(0, 1, 2)):
    return [{"recipe": recipe, "seed": s if recipe != "base" else None, "alpha": None, "delta": None,
             "cell_id": f"{recipe}-{s}", "metric": metric, "value": v, "pairs": 10} for s, v in zip(seeds, values)]


def test_tables_show_mean_and_sample_sd_over_seeds():
    rows = _rows("base", [0.5], seeds=(None,)) + _rows("m3po", [0.6, 0.7, 0.8]) + _rows("dpo", [0.55, 0.55, 0.55])
    md = ex.tables(rows, ["base", "dpo", "m3po"], [], [], 3)
    assert "| M3PO | 0.700 ± 0.100 |" in md          # mean 0.7, sample sd 0.1
    assert "| Vanilla DPO | 0.550 ± 0.000 |" in md
    assert "| Base model | 0.500 |" in md
    assert "| SFT" not in md and "Table 3" not in md  # recipes not run are not shown


def test_without_paired_intervals_the_seeds_are_compared_but_no_verdict_is_given():
    rows = (_rows("base", [0.65], seeds=(None,)) + _rows("m3po", [0.6, 0.7, 0.8])
            + _rows("m3po_alpha0", [0.5, 0.6, 0.7]) + _rows("dpo", [0.7, 0.6, 0.9]))
    lines = "\n".join(ex.verdicts(rows, ["base", "dpo", "m3po", "m3po_alpha0"]))
    assert ("M3PO against M3PO (alpha = 0) on POPE acc: difference +0.100 ± 0.000 (ahead on 3 of 3 seeds; "
            "no paired interval, so no verdict)") in lines
    assert "M3PO against Vanilla DPO on POPE acc: difference -0.033 ± 0.115 (ahead on 1 of 3 seeds;" in lines
    assert "beats" not in lines


def _answers(right: list[bool], category="random"):
    """POPE-style answers to questions 0..n-1 (gold: yes for even ids), right or wrong as given."""
    rows = []
    for i, ok in enumerate(right):
        gold = "yes" if i % 2 == 0 else "no"
        said = gold if ok else ("no" if gold == "yes" else "yes")
        rows.append({"question_id": f"q{i}", "category": category, "instruction": f"is there a thing {i} ?",
                     "answer": gold, "prediction": f"{said} ."})
    return rows


def test_method_against_method_verdicts_come_from_paired_intervals_seed_by_seed():
    n = 400
    cells = ex.grid(["m3po", "dpo", "rm_dpo"], [0, 1])
    clearly = [i % 5 != 0 for i in range(n)]                  # 80 % right
    worse = [i % 5 != 0 and i % 7 != 0 for i in range(n)]     # the same, and wrong on every 7th as well
    answers = {"m3po-seed0": clearly, "m3po-seed1": clearly, "dpo-seed0": worse, "dpo-seed1": worse,
               "rm_dpo-seed0": clearly, "rm_dpo-seed1": worse, "base": worse}
    read = lambda cell_id, bench: _answers(answers[cell_id]) if bench == "pope" else None
    paired = ex.paired_rows(cells, read)
    assert {(r["comparator"], r["seed"]) for r in paired} == {(c, s) for c in ("dpo", "rm_dpo", "base") for s in (0, 1)}
    dpo0 = next(r for r in paired if r["comparator"] == "dpo" and r["seed"] == 0 and r["metric"] == "POPE acc")
    assert dpo0["delta"] == pytest.approx(sum(clearly) / n - sum(worse) / n) and dpo0["low"] > 0
    lines = "\n".join(ex.verdicts([], ["base", "m3po", "dpo", "rm_dpo"], paired))
    assert "M3PO beats Vanilla DPO on POPE acc" in lines and "(2 in M3PO's favour, 0 against)" in lines
    # one seed tied (identical answers: a zero-width interval at 0): no verdict
    assert "M3PO does not clearly beat RM-DPO on POPE acc" in lines and "(1 in M3PO's favour, 0 against)" in lines


def test_cells_apply_their_recipe_and_seed():
    cfg = load_config(TINY)
    cells = ex.grid(["base", "sft", "dpo", "rm_dpo", "m3po_alpha0"], [3], alphas=[0.0, 1.0])
    assert [c.cell_id for c in cells] == ["sft-seed3", "dpo-seed3", "rm_dpo-seed3", "m3po_alpha0-seed3",
                                          "m3po-alpha0-seed3", "m3po-alpha1-seed3"]
    by_id = {c.cell_id: ex.cell_config(cfg, c) for c in cells}
    assert by_id["sft-seed3"].training.loss_type == ["sft"] and by_id["sft-seed3"].selection.strategy == "m3po"
    assert by_id["dpo-seed3"].selection.strategy == "random" and by_id["dpo-seed3"].selection.seed == 3
    assert by_id["rm_dpo-seed3"].selection.strategy == "rm_best_worst"
    assert by_id["m3po-alpha1-seed3"].selection.alpha == 1.0 and by_id["m3po-alpha1-seed3"].training.seed == 3
    assert ex.cell_config(cfg, ex.Cell("ipa", 5)).ipa.seed == 5
    with pytest.raises(ValueError, match="unknown recipes"):
        ex.grid(["m3po", "ppo"], [0])


def test_a_cell_store_shares_the_runs_samples_and_keeps_its_own_results(tmp_path):
    run = RunStore(str(tmp_path), "exp")
    cell = CellStore(run, "dpo-seed0")
    assert cell.path("candidates/shard-00000.parquet") == run.path("candidates/shard-00000.parquet")
    assert cell.path("eval/base_metrics.json") == run.path("eval/base_metrics.json")
    assert cell.path("pairs.parquet") == run.path("cells/dpo-seed0/pairs.parquet")
    with pytest.raises(ValueError, match="cell id"):
        CellStore(run, "a/b")


@pytest.mark.slow
def test_experiment_reuses_the_samples_and_writes_the_tables(tmp_path):
    from m3po.flows.experiment import m3po_experiment

    cfg = load_config(TINY)
    root = str(tmp_path)
    out = m3po_experiment(config=cfg.to_dict(), root=root, run_id="exp", recipes=["base", "sft", "dpo", "rm_dpo",
                          "m3po", "m3po_alpha0"], seeds=[0, 1], alphas=[0.0, 1.0])
    store = RunStore(root, "exp")
    base = Path(store.path(""))
    # samples and scores once, in the run; every cell its own pairs, adapter and metrics
    assert len(list(base.glob("candidates/shard-*.parquet"))) == 3
    assert not list(base.glob("cells/*/candidates")) and not list(base.glob("cells/*/eval"))
    cells = sorted(p.name for p in (base / "cells").iterdir())
    assert len(cells) == 2 * 5 + 2 * 2
    strategies = {c: pq.read_table(base / "cells" / c / "pairs.parquet").column("strategy")[0].as_py() for c in cells}
    assert strategies["dpo-seed0"] == "random" and strategies["rm_dpo-seed1"] == "rm_best_worst"
    assert strategies["m3po_alpha0-seed0"] == "mas_gap" and strategies["sft-seed0"] == "m3po"
    seed0 = (base / "cells/m3po-seed0/adapter/adapter_model.safetensors").read_bytes()
    seed1 = (base / "cells/m3po-seed1/adapter/adapter_model.safetensors").read_bytes()
    assert seed0 != seed1                                    # the seed reaches training
    results = pq.read_table(base / "experiment/results.parquet").to_pylist()
    assert {r["cell_id"] for r in results} == set(cells) | {"base"}
    md = (base / "experiment/tables.md").read_text()
    for heading in ("Table 1", "Table 3", "Table 5"):
        assert heading in md
    assert "| M3PO | " in md and "±" in md and "95 % intervals over questions, seed by seed" in md
    assert "### What the selection did" in md and "\n| 0 | " in md and "\n| 1 | " in md   # each seed's pools
    comparisons = pq.read_table(base / "experiment/comparisons.parquet").to_pylist()
    assert {(r["comparator"], r["metric"]) for r in comparisons} >= {("dpo", "POPE acc"), ("m3po_alpha0", "MME score"),
                                                                   ("base", "POPE F1")}
    assert all(r["low"] <= r["high"] and r["n_boot"] > 0 for r in comparisons)
    assert (base / "experiment/alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert out["markdown"] == md

    # run again: every cell is read from its cache, nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in base.glob("cells/*/adapter/adapter_model.safetensors")}
    m3po_experiment(config=cfg.to_dict(), root=root, run_id="exp", recipes=["base", "dpo", "m3po"], seeds=[0, 1])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_ipa_and_m3po_side_by_side_on_the_same_prompts_and_benchmarks(tmp_path):
    from m3po.flows.experiment import m3po_experiment

    cfg = load_config(TINY)
    root = str(tmp_path)
    m3po_experiment(config=cfg.to_dict(), root=root, run_id="both", recipes=["base", "m3po", "ipa"], seeds=[0])
    store = RunStore(root, "both")
    base = Path(store.path(""))
    assert sorted(p.name for p in (base / "cells").iterdir()) == ["ipa-seed0", "m3po-seed0"]
    ipa_cell = CellStore(store, "ipa-seed0")
    # IPA's first round samples exactly the run's prompts; its pairs are its own
    run_prompts = sorted(store.read_stage("prompts").column("prompt_id").to_pylist())
    assert sorted(ipa_cell.read_stage("ipa/round-1/prompts").column("prompt_id").to_pylist()) == run_prompts
    assert {s.split("-round-")[0] for s in pq.read_table(base / "cells/ipa-seed0/pairs.parquet")
            .column("strategy").to_pylist()} == {"ipa"}
    assert not list(base.glob("cells/*/candidates")) and not list(base.glob("cells/*/eval"))
    results = pq.read_table(base / "experiment/results.parquet").to_pylist()
    metrics = lambda cell: {r["metric"] for r in results if r["cell_id"] == cell}
    assert metrics("ipa-seed0") == metrics("m3po-seed0") and "IFT prompt acc" in metrics("ipa-seed0")
    md = (base / "experiment/tables.md").read_text()
    assert "| IPA |" in md and "| M3PO |" in md and "M3PO" in md and "IPA on" in md
