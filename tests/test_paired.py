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


def test_a_group_of_one_run_each_is_the_plain_paired_interval():
    base, trained = _pope(right=0.6, seed=1), _pope(right=0.7, seed=2)
    mbase, mtrained = _mme(right=0.6, seed=3), _mme(right=0.7, seed=4)
    for bench, a, b in (("pope", base, trained), ("mme", mbase, mtrained)):
        plain, grouped = paired.intervals(bench, a, b, seed=7), paired.group_intervals(bench, [[a]], [[b]], seed=7)
        assert plain.keys() == grouped.keys()
        for metric in plain:
            assert {k: grouped[metric][k] for k in ("delta", "low", "high")} == \
                   {k: plain[metric][k] for k in ("delta", "low", "high")}
            assert grouped[metric]["runs"] == [1, 1]


def test_training_noise_widens_the_grouped_interval_and_a_real_difference_stays_clear_of_it():
    # the same recipe twice: each run's accuracy is its own (0.6, 0.7, 0.8 by training seed), so one run
    # of each compared alone looks like a difference; over 3 pair sets x 3 seeds it is not one
    rates = (0.6, 0.7, 0.8)
    a = [[_pope(right=r, seed=10 * g + i) for i, r in enumerate(rates)] for g in range(3)]
    b = [[_pope(right=r, seed=100 + 10 * g + i) for i, r in enumerate(rates)] for g in range(3)]
    alone = paired.pope_intervals(a[0][0], b[0][2], n_boot=500)["accuracy"]
    assert paired.better(alone)
    grouped = paired.group_intervals("pope", a, b, n_boot=500)["accuracy"]
    assert grouped["low"] < 0 < grouped["high"] and not paired.better(grouped)
    assert grouped["delta"] == pytest.approx(sum(pope.score(r)["accuracy"] for g in b for r in g) / 9
                                             - sum(pope.score(r)["accuracy"] for g in a for r in g) / 9)
    best = [[_pope(right=0.95, seed=200 + 10 * g + i) for i in range(3)] for g in range(3)]
    assert paired.better(paired.group_intervals("pope", a, best, n_boot=500)["accuracy"])


def test_groups_that_do_not_match_are_refused():
    runs = [[_pope(n=20, seed=s)] for s in range(2)]
    with pytest.raises(ValueError, match="2 groups against 1"):
        paired.group_intervals("pope", runs, runs[:1], n_boot=10)
    with pytest.raises(ValueError, match="same number of runs"):
        paired.group_intervals("pope", runs, [runs[0] * 2, runs[1]], n_boot=10)
