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
