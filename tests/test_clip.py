"""Tiny open_clip model: offline creation, training, scoring and save/reload."""

import socket

import numpy as np
import pytest
from PIL import Image

from m3po_core.data.synthetic import WorldBias, caption, make_scenes, render
from m3po_core.scoring.clip import TINY_CLIP, load_clip, normalise, train_tiny_clip


def synthetic_pairs(split: str, n: int) -> tuple[list[Image.Image], list[str]]:
    scenes = make_scenes(seed=0, split=split, n=n)
    return [render(scene) for scene in scenes], [caption(scene) for scene in scenes]


@pytest.fixture(scope="module")
def trained() -> tuple:
    images, captions = synthetic_pairs("train", 600)
    heldout_images, heldout_captions = synthetic_pairs("val", 128)
    logged: list[str] = []
    scorer, metrics = train_tiny_clip(
        images,
        captions,
        steps=120,
        batch_size=32,
        heldout_images=heldout_images,
        heldout_captions=heldout_captions,
        log=logged.append,
    )
    return scorer, metrics, logged


def test_tiny_clip_is_created_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    scorer = load_clip(TINY_CLIP)
    assert scorer.image_size == (64, 64)
    assert scorer.tokenizer(["a red circle"]).shape == (1, 32)


def test_training_beats_chance(trained: tuple) -> None:
    _, metrics, logged = trained
    assert metrics["steps"] == 120
    assert metrics["retrieval_batch"] == 32
    assert metrics["retrieval_chance"] == pytest.approx(1 / 32)
    assert metrics["retrieval_split"] == "heldout"
    assert metrics["retrieval_top1"] > 2 * metrics["retrieval_chance"]
    assert np.isfinite(metrics["final_loss"])
    assert any("step 50/120" in line for line in logged)


def test_score_encodes_each_image_once_and_matches_one_by_one(trained: tuple) -> None:
    scorer = trained[0]
    images, captions = synthetic_pairs("eval", 3)
    texts = [[captions[0], "a blue square at the top left ."], [], captions]
    images_before, texts_before = scorer.n_image_encodes, scorer.n_text_encodes

    similarities = scorer.score(images, texts)

    assert scorer.n_image_encodes - images_before == 3
    assert scorer.n_text_encodes - texts_before == 5  # 2 + 0 + 3 texts
    assert [len(s) for s in similarities] == [2, 0, 3]
    for image, prompt_texts, batched in zip(images, texts, similarities):
        one_by_one = [scorer.score([image], [[text]])[0][0] for text in prompt_texts]
        np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
        assert np.all(np.abs(batched) <= 1 + 1e-6)


def test_save_and_reload_gives_identical_scores(trained: tuple, tmp_path) -> None:
    scorer, metrics, _ = trained
    images, captions = synthetic_pairs("eval", 4)
    texts = [[true_caption, "a green triangle at the bottom right ."] for true_caption in captions]

    reloaded = load_clip(str(scorer.save(tmp_path / "tiny-clip")))

    assert reloaded.arch == TINY_CLIP
    assert reloaded.metrics == metrics
    for original, again in zip(scorer.score(images, texts), reloaded.score(images, texts)):
        np.testing.assert_array_equal(original, again)


def test_normalise_maps_cosine_to_unit_interval() -> None:
    np.testing.assert_allclose(normalise(np.array([-1.0, 0.0, 1.0])), [0.0, 0.5, 1.0])


def test_long_responses_are_scored_in_chunks_not_truncated(trained: tuple) -> None:
    scorer = trained[0]
    limit = scorer.tokenizer.context_length - 2
    images, captions = synthetic_pairs("eval", 2)
    head = " ".join([captions[0]] * 8)                      # well past the context on its own
    same_start_true_tail = f"{head} {captions[0]}"
    same_start_false_tail = f"{head} {' '.join([captions[1]] * 3)}"
    pieces = scorer.chunks(same_start_false_tail)
    assert len(pieces) > 1 and all(n <= limit for _, n in pieces)
    assert " ".join(p for p, _ in pieces) == " ".join(same_start_false_tail.split())  # nothing dropped

    [sims] = scorer.score([images[0]], [[same_start_true_tail, same_start_false_tail]])
    # truncation would give both the same score (their first `limit` tokens are identical)
    assert sims[0] != pytest.approx(sims[1], abs=1e-6)
    # the score is the token-weighted mean of the chunks' cosines
    image = scorer.encode_images([images[0]])[0]
    texts = scorer.encode_texts([p for p, _ in pieces])
    weights = np.array([n for _, n in pieces], dtype=float)
    expected = float((texts @ image).numpy() @ weights / weights.sum())
    assert sims[1] == pytest.approx(expected, abs=1e-5)


def _open_captions(split: str, n: int, negatives: int):
    from m3po_core.data import synthetic
    from m3po_core.data import synthetic_prompts
    from m3po_core.data.wrong_answers import wrong_descriptions

    scenes = make_scenes(0, split, n, synthetic.WorldBias(0.7, 0.0))
    images, captions, wrong = [], [], []
    for s in scenes:
        rng = synthetic.seeded_rng(0, s.scene_id)
        kind = "list"  # what fits the tiny CLIP's 32-token context
        images.append(render(s))
        captions.append(synthetic_prompts.open_reference(s, kind, rng))
        wrong.append(wrong_descriptions(s, kind, rng, negatives))
    return images, captions, wrong


def test_the_clip_trained_on_lists_with_near_misses_ranks_a_true_list_above_each_wrong_one():
    images, captions, wrong = _open_captions("sft", 384, 3)
    held = _open_captions("val", 96, 3)
    common = dict(steps=120, batch_size=64, seed=0, heldout_images=held[0], heldout_captions=held[1],
                  heldout_negatives=held[2])
    scenes = make_scenes(0, "sft", 384, WorldBias(0.7, 0.0))
    _, canonical = train_tiny_clip(images, [caption(s) for s in scenes], **common)  # as before hard_negatives
    _, hard = train_tiny_clip(images, captions, negatives=wrong, **common)
    assert hard["hard_negative_accuracy"] > 0.9, hard
    assert hard["hard_negative_accuracy"] > canonical["hard_negative_accuracy"] + 0.05, (canonical, hard)
    with pytest.raises(ValueError, match="negatives"):
        train_tiny_clip(images, captions, negatives=wrong[:-1], steps=1)
