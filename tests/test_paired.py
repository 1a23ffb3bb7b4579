"""Paired bootstrap intervals: point estimates are the benchmarks' own differences, the interval
holds the point, is zero-width for the same answers, and says "better" only clear of zero."""
import random

import pytest

from m3po_core.evaluation import mme, paired, pope


def _pope(n=400, right=0.6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gold = "yes" if i % 2 else "no"
        said = gold if rng.random() < right else ("no" if gold == "yes" else "yes")
        out.append({"question_id": f"q{i}", "category": ["random", "popular"][i % 4 // 2], "answer": gold,
                    "prediction": said.capitalize() + "."})
    return out


def _mme(n_images=60, right=0.6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n_images):
        for gold in ("yes", "no"):
            said = gold if rng.random() < right else ("no" if gold == "yes" else "yes")
            out.append({"question_id": f"img{i}.png", "category": ["color", "existence", "OCR"][i % 3],
                        "instruction": f"q {gold}", "answer": gold, "prediction": said})
    return out


def test_pope_points_are_the_benchmarks_differences_and_lie_in_their_intervals():
    base, trained = _pope(right=0.6, seed=1), _pope(right=0.8, seed=2)
    ci = paired.pope_intervals(base, trained, n_boot=500)
    for metric in ("accuracy", "f1"):
        assert ci[metric]["delta"] == pytest.approx(pope.score(trained)[metric] - pope.score(base)[metric])
        assert ci[metric]["low"] <= ci[metric]["delta"] <= ci[metric]["high"]
    assert paired.better(ci["accuracy"]) and ci["accuracy"]["low"] > 0.1


def test_mme_point_is_the_score_difference_resampled_by_image():
    base = _mme(right=0.6, seed=3)
    ci = paired.mme_intervals(base, _mme(right=0.9, seed=4), n_boot=500)["score"]
    assert ci["delta"] == pytest.approx(mme.score(_mme(right=0.9, seed=4))["score"] - mme.score(base)["score"])
    assert ci["low"] <= ci["delta"] <= ci["high"] and paired.better(ci)
    # one wrong answer put right (and another put wrong) on 60 images: no verdict
    trained = [dict(r) for r in base]
    wrong = [i for i, r in enumerate(base) if r["prediction"] != r["answer"]]
    right = [i for i, r in enumerate(base) if r["prediction"] == r["answer"]]
    trained[wrong[0]]["prediction"] = trained[wrong[0]]["answer"]
    trained[right[0]]["prediction"] = "no" if trained[right[0]]["answer"] == "yes" else "yes"
    small = paired.mme_intervals(base, trained, n_boot=500)["score"]
    assert small["delta"] == pytest.approx(mme.score(trained)["score"] - mme.score(base)["score"])
    assert small["low"] < 0 < small["high"] and not paired.better(small)


def test_the_same_answers_give_a_zero_interval_and_no_verdict():
    base = _pope(seed=5)
    ci = paired.pope_intervals(base, [dict(r) for r in base], n_boot=200)["accuracy"]
    assert ci["delta"] == ci["low"] == ci["high"] == 0 and not paired.better(ci)


def test_answers_to_other_questions_are_refused():
    base = _pope(n=10)
    with pytest.raises(ValueError, match="q9"):
        paired.pope_intervals(base, base[:9], n_boot=10)
