"""The selection's diagnostics: pool variety, where M3PO's rejected answer departs from alpha = 0 and vanilla DPO."""
import pyarrow as pa
import pytest

from m3po_core.selection_diagnostics import PoolDiagnostics, describe


def pool_table():
    rows = [  # prompt, cand, text, judge, mas, logp
        ("p1", 0, "a black cat", 9.0, 0.90, -0.10),   # the winner
        ("p1", 1, "a dog?", 2.0, 0.30, -2.00),        # lowest MAS but unlikely: alpha = 0's rejected
        ("p1", 2, "a cat and a dog", 3.0, 0.35, -0.15),  # confidently wrong: M3PO's rejected
        ("p2", 0, "same", 5.0, 0.50, -0.20),          # one answer, one MAS: no pair
        ("p2", 1, "same", 5.0, 0.50, -0.20),
        ("p3", 0, "right", 8.0, 0.80, -0.10),
        ("p3", 1, "wrong", 1.0, 0.20, -0.10),
        ("p3", 2, "wrong", 1.0, 0.20, -0.10),
    ]
    cols = list(zip(*rows))
    return pa.table({"prompt_id": list(cols[0]), "cand_idx": pa.array(cols[1], pa.int32()), "text": list(cols[2]),
                     "judge": list(cols[3]), "mas": list(cols[4]), "logp": list(cols[5])})


def test_a_confident_wrong_answer_moves_m3po_away_from_alpha_zero():
    d = PoolDiagnostics(alpha=0.5, delta=0.1, seed=0)
    d.add(pool_table())
    s = d.summary()
    assert s["pools"] == 2                                       # p2 yields no pair: not a selected pool
    assert s["share_rejected_differs_from_alpha0"] == 0.5        # p1 differs, p3 ties on the same candidate
    assert s["median_distinct_answers"] == 2.5 and s["median_distinct_ratings"] == 2.5
    assert s["pools_with_confidently_wrong"] == 2
    assert s["rejected_mean_mas"]["m3po"] == pytest.approx((0.35 + 0.20) / 2)
    assert s["rejected_mean_mas"]["alpha0"] == pytest.approx((0.30 + 0.20) / 2)
    assert s["rejected_mean_logp"]["m3po"] > s["rejected_mean_logp"]["alpha0"]   # M3PO rejects the confident one
    assert any("differs from alpha = 0's in 50.0%" in line for line in describe(s))


def test_with_alpha_zero_nothing_differs_and_shards_accumulate():
    d = PoolDiagnostics(alpha=0.0, delta=0.1, seed=0)
    d.add(pool_table())
    d.add(pool_table().set_column(0, "prompt_id", pa.array(["q1"] * 3 + ["q2"] * 2 + ["q3"] * 3)))
    s = d.summary()
    assert s["pools"] == 4 and s["share_rejected_differs_from_alpha0"] == 0.0


def test_the_experiment_table_has_a_row_per_seed():
    from m3po_core.selection_diagnostics import diagnostics_table

    d = PoolDiagnostics(alpha=0.5, delta=0.1, seed=0)
    d.add(pool_table())
    lines = diagnostics_table({0: d.summary(), 1: d.summary(), 2: None})
    assert lines[0].startswith("### What the selection did") and len([l for l in lines if l.startswith("| 0 |")]) == 1
    assert len([l for l in lines if l.startswith("| 1 |")]) == 1 and not any(l.startswith("| 2 |") for l in lines)
    assert "50.0%" in lines[4]
