"""MAS's CLIP term: CLIPScore for pretrained encoders, (cos + 1) / 2 for the tiny CLIP, and the report's
account of what drives selection (each term's share of the within-prompt variance of MAS)."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from m3po_core import schema
from m3po_core.config import load_config
from m3po_core.errors import ConfigError
from m3po_core.scoring.clip import TINY_CLIP, clipscore, load_clip, normalise
from m3po_core.scoring.mas import score_candidates, variance_shares
from m3po_core.stages.runner import stage_config
from m3po_core.store import RunStore

TINY = Path(__file__).parent / "tiny.yaml"


def test_clipscore_is_two_and_a_half_times_the_positive_cosine_clipped_to_one():
    np.testing.assert_allclose(clipscore(np.array([-0.3, 0.0, 0.1, 0.2, 0.4, 0.9])), [0, 0, 0.25, 0.5, 1, 1])
    # the band a pretrained CLIP's cosines sit in: CLIPScore spreads it, (cos + 1) / 2 hardly moves
    band = np.array([0.15, 0.35])
    assert np.ptp(clipscore(band)) == pytest.approx(0.5) and np.ptp(normalise(band)) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides, mapping", [
    ([], "affine"),                                                      # the tiny CLIP: cosines span [-1, 1]
    (["scoring.clip.name=ViT-L-14", "scoring.clip.pretrained=openai"], "clipscore"),
    (["scoring.clip.name=ViT-L-14", "scoring.clip_mapping=affine"], "affine"),
    (["scoring.clip_mapping=clipscore"], "clipscore"),
])
def test_auto_resolves_by_encoder(overrides, mapping):
    cfg = load_config(TINY, overrides)
    assert cfg.scoring.cosine_mapping(cfg.scoring.clip.name) == mapping
    key = stage_config(cfg, "scores")
    # the scores' key holds the setting and the encoder it resolves by (name and weights)
    assert key["scoring.clip_mapping"] == cfg.scoring.clip_mapping
    assert key["scoring.clip.name"] == cfg.scoring.clip.name and "scoring.clip.pretrained" in key
    other = "clipscore" if mapping == "affine" else "affine"
    assert stage_config(load_config(TINY, [*overrides, f"scoring.clip_mapping={other}"]), "scores") != key


def test_an_unknown_mapping_is_refused_by_key():
    with pytest.raises(ConfigError, match="scoring.clip_mapping.*'logit'"):
        load_config(TINY, ["scoring.clip_mapping=logit"])


def test_mas_applies_the_configured_mapping():
    class ConstantJudge:  # stands for the judge only: the encoder is a real open_clip model
        def score(self, items):
            from m3po_core.scoring.judge import weighted_score

            return [weighted_score(relevance=7, accuracy=7, adherence=7) for _ in items]

    clip = load_clip(TINY_CLIP)
    images = [Image.new("RGB", (32, 32), (200, 30, 30))]
    texts = ["a red square", "a blue circle", "two green triangles"]
    cands = pa.table({"prompt_id": ["p"] * 3, "cand_idx": [0, 1, 2], "text": texts})
    [cos] = clip.score(images, [texts])
    judge = ConstantJudge().score([None])[0].overall
    for mapping, unit in (("affine", normalise), ("clipscore", clipscore)):
        cfg = load_config(TINY, [f"scoring.clip_mapping={mapping}"]).scoring
        table = score_candidates([{"prompt_id": "p", "instruction": "Describe it."}], images, cands, clip, cfg,
                                 judge=ConstantJudge())
        np.testing.assert_allclose(table.column("clip").to_numpy(), cos, rtol=1e-6)
        np.testing.assert_allclose(table.column("mas").to_numpy(), 0.2 * unit(cos) + 0.8 * judge, rtol=1e-6)


def test_variance_shares_by_hand():
    # prompt a: clip terms 0, 0.2 and judge terms 0, 0.8 move together; prompt b: only the judge moves;
    # prompt c has no spread, d one candidate; the offset between prompts is no part of it
    groups = [[(0.0, 0.0), (0.2, 0.8)], [(0.1, 0.8), (0.1, 0.4), (0.1, 0.0)], [(0.5, 0.2), (0.5, 0.2)],
              [(0.9, 0.9)]]
    # sums of squares: clip 0.02; judge 0.32 + 0.32; cross 2 * (0.04 + 0.04) = 0.16; total 0.82
    shares = variance_shares(groups)
    assert shares == pytest.approx({"clip": 0.02 / 0.82, "judge": 0.64 / 0.82, "covariance": 0.16 / 0.82})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert variance_shares([[(0.1, 0.5), (0.1, 0.5)]]) is None


def test_report_shows_the_shares_of_a_pool_with_known_components(tmp_path):
    from m3po_core.report import _mas_line, mas_variance_shares

    cfg = load_config(TINY)
    store = RunStore(str(tmp_path), "r")
    # judge ratings 0.5 / 1.0 and CLIP terms 0.1 / 0.0: MAS = clip term + 0.8 * judge; one unrated
    rows = [("p", 0, 0.1, 0.5), ("p", 1, 0.0, 1.0), ("p", 2, None, None)]
    table = pa.Table.from_pylist([
        {"prompt_id": p, "cand_idx": i, "clip": 0.0, "judge": j, "judge_relevance": j, "judge_accuracy": j,
         "judge_adherence": j, "mas": None if j is None else c + 0.8 * j} for p, i, c, j in rows], schema.SCORES)
    store.publish_shard("scores", 0, table, schema.SCORES, key="k")
    shares = mas_variance_shares(cfg, store, 1)
    # deviations: clip +-0.05, judge -+0.2: ss 0.005, 0.08, cross 2 * (-0.02) = -0.04; total 0.045
    assert shares == pytest.approx({"clip": 0.005 / 0.045, "judge": 0.08 / 0.045, "covariance": -0.04 / 0.045})
    [line] = _mas_line(cfg, shares)
    assert "judge term 177.8 %" in line and "CLIP term 11.1 %" in line and "affine" in line
