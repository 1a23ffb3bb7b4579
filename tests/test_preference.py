"""Simulated human preference: 1-5 ratings and the pairwise win rate, worked out by hand."""
import math

from m3po_core.evaluation import preference
from m3po_core.scoring.judge import weighted_score


def test_ratings_map_to_one_to_five_and_unrated_responses_are_left_out():
    ratings = [weighted_score(relevance=1.0, accuracy=0.5, adherence=0.0),
               weighted_score(relevance=0.5, accuracy=1.0, adherence=1.0), None]
    m = preference.score([{}, {}, {}], ratings)
    assert m["n"] == 3 and m["unrated"] == 1
    assert m["accuracy"] == (3.0 + 5.0) / 2        # 1 + 4 * 0.5, 1 + 4 * 1
    assert m["relevance"] == (5.0 + 3.0) / 2
    assert m["helpfulness"] == (1.0 + 5.0) / 2      # the adherence aspect
    assert math.isclose(m["overall"], (1 + 4 * ratings[0].overall + 1 + 4 * ratings[1].overall) / 2)


def test_win_rate_counts_ties_half_and_skips_unrated_pairs():
    trained = {"a": 0.9, "b": 0.5, "c": 0.2, "d": None, "e": 0.7}
    base = {"a": 0.4, "b": 0.5, "c": 0.6, "d": 0.3, "e": 0.1}
    w = preference.win_rate(trained, base)
    assert (w["compared"], w["wins"], w["ties"], w["losses"]) == (4, 2, 1, 1)
    assert w["win_rate"] == (2 + 0.5) / 4
    assert math.isnan(preference.win_rate({}, {})["win_rate"])
