"""metrics.json keeps the trained model under "trained"; runs written before the rename (under
"m3po", whatever the method) still read, evaluate and report the same."""
from m3po_core.report import comparison_rows, markdown_table, win_rate_line
from m3po_core.stages.evaluate import trained_under_its_name

BASE = {"pope": {"accuracy": 0.6, "f1": 0.5}, "mme": {"score": 400.0}}
TRAINED = {"pope": {"accuracy": 0.7, "f1": 0.6}, "mme": {"score": 450.0},
           "preference": {"win_rate": 0.55, "wins": 11, "ties": 0, "losses": 9}}


def test_an_old_record_reads_as_the_new_one():
    old = {"key": "k", "base": BASE, "m3po": TRAINED, "attempts": 1}
    new = {"key": "k", "base": BASE, "trained": TRAINED, "attempts": 1}
    assert trained_under_its_name(old) == new
    assert trained_under_its_name(new) == new and trained_under_its_name(None) is None
    rows = comparison_rows(trained_under_its_name(old))
    assert markdown_table(rows) == markdown_table(comparison_rows(new))  # (NaN rows: unmeasured metrics)
    pope = next(r for r in rows if r["metric"] == "POPE accuracy")
    assert pope["trained"] == 0.7 and abs(pope["delta"] - 0.1) < 1e-12
    assert "| POPE accuracy | 0.600 | 0.700 | +0.100 |" in markdown_table(rows)
    assert "win rate 0.550" in win_rate_line(new)
