"""BLIP-2 image-text matching behind the encoder interface (a tiny BLIP-2 built here, the real
transformers classes): the same probabilities as the model's own forward, one vision pass per
image, loadable by name from a saved directory, and entering MAS unnormalised."""
import numpy as np
import pytest
import torch
from PIL import Image

from m3po_core.scoring.blip2 import Blip2ItmScorer
from m3po_core.scoring.clip import load_encoder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "the", "is",
         "at", "top", "left", ".", ","]


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    d = tmp_path_factory.mktemp("blip2")
    (d / "vocab.txt").write_text("\n".join(VOCAB))
    tokenizer = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=len(VOCAB), encoder_hidden_size=32, max_position_embeddings=64,
                            use_qformer_text_input=True),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=50),
        num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    return Blip2ItmScorer(model, BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, batch_size=2)


IMAGES = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")]
TEXTS = [["a red circle", "the blue square is at the top left .", "a"], ["blue", "a red square ."]]


def test_matches_the_models_own_forward_with_one_vision_pass_per_image(tiny_blip2):
    scorer = tiny_blip2
    scores = scorer.score(IMAGES, TEXTS)
    assert scorer.n_image_encodes == 2 and scorer.n_text_encodes == 5
    for image, texts, got in zip(IMAGES, TEXTS, scores):
        pixels = scorer.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        for text, value in zip(texts, got):
            tok = scorer.tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                out = scorer.model(pixel_values=pixels, input_ids=tok["input_ids"],
                                   attention_mask=tok["attention_mask"], use_image_text_matching_head=True)
            assert value == pytest.approx(out.logits_per_image.softmax(-1)[0, 1].item(), abs=1e-5)
    assert all(((s >= 0) & (s <= 1)).all() for s in scores)
    assert scorer.unit_scores(np.array([0.25])) == 0.25  # a probability: MAS uses it as is


def test_saved_directory_loads_through_the_one_factory(tiny_blip2, tmp_path):
    tiny_blip2.save(tmp_path / "itm")
    again = load_encoder(str(tmp_path / "itm"))
    assert isinstance(again, Blip2ItmScorer) and again.kind == "probability"
    for a, b in zip(again.score(IMAGES, TEXTS), tiny_blip2.score(IMAGES, TEXTS)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert isinstance(load_encoder(f"blip2:{tmp_path / 'itm'}"), Blip2ItmScorer)


def test_mas_takes_the_match_probability_unnormalised(tiny_blip2):
    import pyarrow as pa

    from m3po_core.config import ScoringConfig
    from m3po_core.scoring.mas import score_candidates
    from m3po_core.scoring.judge import weighted_score

    class ConstantJudge:
        name = "constant"

        def score(self, items):
            return [weighted_score(1.0, 1.0, 1.0)] * len(items)

    prompts = [{"prompt_id": "p0", "instruction": "describe"}]
    cands = pa.table({"prompt_id": ["p0", "p0"], "cand_idx": pa.array([0, 1], pa.int32()),
                      "text": TEXTS[0][:2]})
    table = score_candidates(prompts, IMAGES[:1], cands, tiny_blip2, ScoringConfig(), judge=ConstantJudge())
    probs = tiny_blip2.score(IMAGES[:1], [TEXTS[0][:2]])[0]
    np.testing.assert_allclose(table.column("clip").to_numpy(), probs, atol=1e-6)
    np.testing.assert_allclose(table.column("mas").to_numpy(), 0.2 * probs + 0.8, atol=1e-6)
