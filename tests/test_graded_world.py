"""The graded world end to end (configs/graded.yaml's settings at test size): open-ended prompts,
the CLIP trained against near misses, the CHAIR-style benchmark in metrics.json and the report card."""
import json
from pathlib import Path

import pytest

from m3po_core.config import load_config
from m3po_core.data import synthetic
from m3po_core.store import RunStore

pytestmark = pytest.mark.slow
TINY = Path(__file__).parent / "tiny.yaml"
GRADED = ["data.world.open_per_scene=3", "data.world.cooccurrence=0.7", "data.world.answer_bias=0.8",
          "scoring.clip.hard_negatives=2", "sampling.max_new_tokens=40", "evaluation.open_max_new_tokens=40",
          "evaluation.benchmarks=[pope,chair]"]


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory):
    from m3po.flows.pipeline import m3po_pipeline

    root = str(tmp_path_factory.mktemp("graded"))
    cfg = load_config(TINY, GRADED)
    m3po_pipeline(config=cfg.to_dict(), root=root, run_id="g")
    return cfg, RunStore(root, "g")


def test_the_graded_run_asks_open_questions_of_its_own_base(graded_run):
    cfg, store = graded_run
    prompts = store.read_stage("prompts", 1 + (12 * 5 - 1) // cfg.data.shard_size).to_pylist()
    kinds = [p["kind"] for p in prompts]
    assert len(prompts) == 12 * 5 and sum(k in synthetic.OPEN_KINDS for k in kinds) == 12 * 3
    base = next(Path(store.shared_path("_models")).glob("tiny-llava-*"))
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"objects", "detail"} <= set(vocab)  # the open kinds' words, which the demo's base lacks
    clip = json.loads(next(Path(store.shared_path("_models")).glob("tiny-clip-*/m3po_clip.json")).read_text())
    assert 0 <= clip["metrics"]["hard_negative_accuracy"] <= 1


def test_chair_is_scored_for_both_models_with_paired_intervals_and_reported(graded_run):
    cfg, store = graded_run
    metrics = store.read_json("metrics.json")
    for side in ("base", "trained"):
        got = metrics[side]["chair"]
        assert got["n"] == cfg.data.world.n_eval_scenes
        assert 0 <= got["chair_s"] <= 1 and 0 <= got["chair_i"] <= 1 and 0 <= got["recall"] <= 1
    for key in ("chair_s", "chair_i", "recall"):
        ci = metrics["intervals"]["chair"][key]
        assert ci["low"] <= ci["delta"] <= ci["high"]
        assert ci["delta"] == pytest.approx(metrics["trained"]["chair"][key] - metrics["base"]["chair"][key])
    report = Path(store.path("report.md")).read_text()
    assert "| CHAIR_s (lower is better) |" in report and "CHAIR_i (lower is better): " in report
    stats = store.read_json("pairs_stats.json")["diagnostics"]
    assert stats["pools"] == store.read_json("pairs_stats.json")["pairs"] and stats["median_distinct_answers"] >= 1


def test_the_validation_sweep_splits_a_runs_pairs_by_instruction_kind(graded_run):
    """bench/validation_sweep.py --pair-kinds: which pairs move which skill (docs/demo.md)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from validation_sweep import pair_subsets

    _, store = graded_run
    pairs = store.read_table("pairs.parquet").to_pylist()
    kind = {r["prompt_id"]: r["kind"] for r in store.read_stage("prompts").to_pylist()}
    subsets = pair_subsets(store, pairs, ["short", "open", "-locate", "exist+list"])
    assert subsets["all pairs"] == pairs
    assert {kind[p["prompt_id"]] for p in subsets["open"]} <= set(synthetic.OPEN_KINDS)
    assert len(subsets["short"]) + len(subsets["open"]) == len(pairs) and subsets["open"] and subsets["short"]
    assert [p for p in pairs if kind[p["prompt_id"]] != "locate"] == subsets["-locate"]
    assert {kind[p["prompt_id"]] for p in subsets["exist+list"]} <= {"exist", "list"}
    with pytest.raises(ValueError, match="unknown instruction kind 'lsit'"):
        pair_subsets(store, pairs, ["lsit"])


def test_the_oracle_sft_trains_on_the_scene_graphs_true_answers(graded_run):
    """bench/oracle_sft.py: the chosen answers are the true ones, the judge's full marks, with EOS."""
    import sys

    from m3po_core import models
    from m3po_core.scoring.judge import JudgeItem, ReferenceJudge
    from m3po_core.stages.base_models import ensure_base_model

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from oracle_sft import oracle_pairs

    cfg, store = graded_run
    _, processor = models.load_vlm(f"{store.root}/{ensure_base_model(cfg, store).split(':', 1)[1]}")
    pairs = oracle_pairs(store, processor.tokenizer)
    assert len(pairs) == store.read_table("pairs.parquet").num_rows > 0
    scenes = {r["prompt_id"]: r["scene"] for r in store.read_stage("prompts").to_pylist()}
    scores = ReferenceJudge().score([JudgeItem(p["prompt_id"], p["instruction"], p["chosen"], meta={"scene": scenes[p["prompt_id"]]})
                                     for p in pairs])
    assert min(s.accuracy for s in scores) == 1.0
    eos = processor.tokenizer.eos_token_id
    assert all(p["chosen_token_ids"][-1] == eos and processor.tokenizer.decode(p["chosen_token_ids"][:-1]) == p["chosen"]
               for p in pairs)
