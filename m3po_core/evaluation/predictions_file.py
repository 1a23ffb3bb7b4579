"""`m3po score-predictions FILE`: a predictions file scored under every public harness's rule, so a
model evaluated anywhere can be put beside this project's numbers.

The file has one row per question with `question_id`, `category`, `answer` (yes/no, any case) and
`prediction` (the raw reply), as Parquet, CSV or JSON Lines (`.parquet`, `.csv`, `.jsonl`/`.json`),
local or on any fsspec URL. For MME, `question_id` names the image (its two questions share it), as
in the public release. The benchmark is told by the categories (POPE's splits or MME's subtasks)
unless given. Limit: the file is read whole (a benchmark is at most tens of thousands of rows).
"""
from __future__ import annotations

import io
import json
from typing import Any

from m3po_core.errors import InputError
from m3po_core.evaluation import mme, pope

FIELDS = ("question_id", "category", "answer", "prediction")
POPE_SPLITS = ("random", "popular", "adversarial")


def read_predictions(path: str) -> list[dict[str, Any]]:
    """The file's rows with the four fields as text; InputError naming the file (and row) at fault."""
    from fsspec.core import url_to_fs

    fs, local = url_to_fs(path)
    if not fs.exists(local):
        raise InputError(f"{path}: no such predictions file")
    with fs.open(local, "rb") as f:
        data = f.read()
    kind = next((k for k in ("parquet", "csv", "jsonl", "json") if local.lower().endswith("." + k)), None)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        elif kind == "csv":
            import pyarrow.csv as pcsv

            # every column as text: a numeric question_id stays what it says, an empty reply stays ""
            rows = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(
                column_types={f: "string" for f in FIELDS}, strings_can_be_null=False)).to_pylist()
        elif kind in ("jsonl", "json"):
            rows = []
            for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path} line {n}: not JSON ({e.msg})") from None
        else:
            raise InputError(f"{path}: unknown predictions format; name it .parquet, .csv or .jsonl")
    except InputError:
        raise
    except Exception as e:  # pyarrow's reading errors: say which file
        raise InputError(f"{path}: cannot read it as {kind}: {e}") from None
    if not rows:
        raise InputError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{path} row {i}: not an object with fields {list(FIELDS)}")
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise InputError(f"{path} row {i}: missing field(s) {missing} (has {sorted(row)})")
        if row["prediction"] is None:
            raise InputError(f"{path} row {i} (question_id {row['question_id']!r}): empty 'prediction' "
                             "(write an empty reply as \"\")")
        out.append({f: str(row[f]) for f in FIELDS})
    return out


def guess_benchmark(rows: list[dict[str, Any]], path: str) -> str:
    categories = {c for r in rows for c in r["category"].split(",")}
    if categories <= set(POPE_SPLITS):
        return "pope"
    if categories <= set(mme.PERCEPTION) | set(mme.COGNITION):
        return "mme"
    raise InputError(f"{path}: categories {sorted(categories)[:8]} are neither POPE's splits nor MME's subtasks; "
                     "say which with --benchmark pope|mme")


def score_file(path: str, benchmark: str | None = None) -> dict[str, Any]:
    """`{"file", "benchmark", "n", "rules": {rule: metrics}}` for a predictions file."""
    rows = read_predictions(path)
    bench = benchmark or guess_benchmark(rows, path)
    if bench not in ("pope", "mme"):
        raise InputError(f"--benchmark {bench!r}: one of pope, mme")
    try:
        rules = (pope if bench == "pope" else mme).every_rule(rows)
    except InputError as e:  # the scorers name the row; add the file
        raise InputError(f"{path}: {e}") from None
    return {"file": path, "benchmark": bench, "n": len(rows), "rules": rules}


def render(result: dict[str, Any]) -> str:
    """The scores as a plain-text table, one line per rule."""
    rules = result["rules"]
    if result["benchmark"] == "pope":
        splits = [s for s in POPE_SPLITS if all(s in m["per_category"] for m in rules.values())]
        head = ["rule", "accuracy", "precision", "recall", "F1", "mean F1 of splits", *[f"F1 {s}" for s in splits],
                "yes-ratio", "unread"]
        lines = [[rule, *(f"{m[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1")),
                  f"{m['mean_of_splits']['f1']:.4f}", *(f"{m['per_category'][s]['f1']:.4f}" for s in splits),
                  f"{m['yes_ratio']:.4f}" + (" (gold)" if m["yes_ratio_means"] == "gold" else ""), str(m["unknown"])]
                 for rule, m in rules.items()]
    else:
        head = ["rule", "score", "perception", "cognition", "unread"]
        lines = [[rule, f"{m['score']:.2f}", f"{m['perception']:.2f}", f"{m['cognition']:.2f}", str(m["unknown"])]
                 for rule, m in rules.items()]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([f"{result['benchmark'].upper()}: {result['n']} predictions from {result['file']}",
                      fmt(head), *map(fmt, lines)]) + "\n"
