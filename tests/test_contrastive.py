"""Contrastive sampling: perturbed images (IPA), offered to M3PO as extra hard negatives."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from m3po_core import perturb
from m3po_core.selection import select_pairs

TINY = Path(__file__).parent / "tiny.yaml"


def test_each_perturbation_changes_the_image_and_is_reproducible():
    img = Image.new("RGB", (64, 64), "white")
    img.paste((200, 30, 30), (16, 16, 48, 48))
    for kind in perturb.KINDS:
        a, b = perturb.perturb(img, kind, seed=5), perturb.perturb(img, kind, seed=5)
        assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(img)), kind
    with pytest.raises(ValueError, match="unknown perturbation 'rotate'"):
        perturb.perturb(img, "rotate", 0)
    draws = [perturb.draw(0, "p1", k) for k in range(30)]
    assert draws == [perturb.draw(0, "p1", k) for k in range(30)]
    assert {kind for kind, _ in draws} == set(perturb.KINDS)


def test_a_perturbed_candidate_is_never_chosen():
    table = pa.table({"prompt_id": ["a"] * 3, "cand_idx": pa.array([0, 1, 2], pa.int32()),
                      "mas": [0.5, 0.4, 0.9], "logp": [-1.0, -1.0, -1.0], "judge": [0.5, 0.4, 0.9],
                      "perturbation": ["", "", "blur"]})
    pairs, _ = select_pairs(table, strategy="m3po")
    # the blurred-image answer has the best MAS but can only be rejected; it is not below the
    # winner's MAS, so the clean worse answer is the negative
    assert pairs.column("chosen_idx").to_pylist() == [0] and pairs.column("rejected_idx").to_pylist() == [1]
    table = table.set_column(2, "mas", pa.array([0.5, 0.4, 0.1]))
    pairs, _ = select_pairs(table, strategy="mas_gap")
    assert pairs.column("rejected_idx").to_pylist() == [2]   # as a negative it is taken


@pytest.mark.slow
def test_contrastive_candidates_are_sampled_on_perturbed_images(tmp_path):
    from m3po_core.stages import base_models, prompts, sample
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    cfg = load_config(TINY, ["sampling.contrastive_n=3"])
    store = RunStore(str(tmp_path), "contrastive")
    prompts.prepare_prompts(cfg, store)
    model_ref = base_models.ensure_base_model(cfg, store)
    sample.sample_shard(cfg, store, 0, model_ref)
    cands = store.read_table(RunStore.shard_rel("candidates", 0)).to_pylist()
    n_prompts = len(prompts.read_prompts_shard(store, 0))
    assert len(cands) == n_prompts * (cfg.sampling.n + 3)
    extra = [c for c in cands if c["cand_idx"] >= cfg.sampling.n]
    assert len(extra) == 3 * n_prompts and all(c["perturbation"] in perturb.KINDS for c in extra)
    assert all(c["perturbation"] == "" for c in cands if c["cand_idx"] < cfg.sampling.n)
    assert all(c["token_ids"] and np.isfinite(c["logp_sum"]) for c in extra)


def test_a_prompt_whose_rated_candidates_are_all_perturbed_gives_no_pair():
    """No clean winner: no pair, counted apart (and never another prompt's answer as the winner)."""
    table = pa.table({"prompt_id": ["a", "a", "b", "b"], "cand_idx": pa.array([0, 1, 0, 1], pa.int32()),
                      "mas": [0.9, 0.2, 0.6, 0.5], "logp": [-1.0] * 4, "judge": [0.9, 0.2, 0.6, 0.5],
                      "perturbation": ["", "", "noise", "blur"]})
    pairs, stats = select_pairs(table, strategy="m3po")
    assert pairs.column("prompt_id").to_pylist() == ["a"] and stats.skipped_no_clean_winner == 1
