"""What the M3P-Score's confidence term changed, measured on the pools before any benchmark.

For every prompt's pool of candidates (the columns selection reads, plus `text` and `judge`):

- how varied the pool is: its distinct answers, judge ratings and MAS values (MAS rounded to 1e-6);
- the rejected answer under three strategies on the same pool: M3PO (eq. 2-3 with the run's alpha
  and delta), its alpha = 0 ablation (`mas_gap`, the lowest MAS) and vanilla DPO (`random`, a
  worse candidate drawn with the run's seed); the share of prompts whose M3PO rejected answer
  differs from each, and the mean MAS and log P of the rejected answers under each;
- whether the pool holds a "confidently wrong" candidate: MAS below the winner's by more than
  `margin` (0.2 of MAS's [0, 1]) while its log P is within delta of the winner's (so eq. 2 pays it
  no confidence penalty). That is what M3PO is for; a pool without one gives the term nothing to do.

If the pools hold one or two distinct answers, every wrong candidate ties on MAS and M3PO can only
break the tie by log P: the share that differs from alpha = 0 says whether it ever did.
`PoolDiagnostics` accumulates shard by shard (one small array per prompt) and `summary()` gives
the figures pairs_stats.json, the report card, the viewer and `m3po experiment` show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from m3po_core.selection import select_pairs

MARGIN = 0.2


def _per_group_distinct(group: np.ndarray, n_groups: int, values: list | None) -> np.ndarray:
    """Distinct values per group (None and NaN, unrated, are not values); zeros without the column."""
    if values is None:
        return np.zeros(n_groups, dtype=np.int64)
    pairs = {(g, v) for g, v in zip(group.tolist(), values) if v is not None and v == v}
    return np.bincount(np.fromiter((g for g, _ in pairs), dtype=np.int64, count=len(pairs)), minlength=n_groups)


@dataclass
class PoolDiagnostics:
    alpha: float
    delta: float
    seed: int = 0
    margin: float = MARGIN
    rows: dict[str, list] = field(default_factory=lambda: {k: [] for k in (
        "answers", "ratings", "mas_values", "differs_alpha0", "differs_random", "confidently_wrong",
        "mas_m3po", "mas_alpha0", "mas_random", "logp_m3po", "logp_alpha0", "logp_random")})

    def add(self, table: pa.Table, logp_column: str = "logp", m3po_pairs: pa.Table | None = None) -> None:
        """One shard's candidates with their scores (selection's input; `text` and `judge` if present).
        `m3po_pairs`: M3PO's pairs of this table at these settings, where the caller selected them
        already (the select stage), so they are not selected twice."""
        picked, winner = {}, {}
        for name, strategy in (("m3po", "m3po"), ("alpha0", "mas_gap"), ("random", "random")):
            pairs = m3po_pairs if name == "m3po" and m3po_pairs is not None else \
                select_pairs(table, self.alpha, self.delta, strategy, logp_column, self.seed)[0]
            cols = [pairs.column(c).to_pylist() for c in ("prompt_id", "rejected_idx", "mas_rejected", "logp_rejected",
                                                          "mas_chosen", "logp_chosen")]
            picked[name] = {p: (r, m, lp) for p, r, m, lp, _, _ in zip(*cols)}
            winner = winner or {p: (m, lp) for p, _, _, _, m, lp in zip(*cols)}  # eq. 1: the same for all three
        prompt_ids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
        uniq, group = np.unique(prompt_ids, return_inverse=True)
        mas = table.column("mas").to_numpy(zero_copy_only=False).astype(np.float64)
        logp = table.column(logp_column).to_numpy(zero_copy_only=False).astype(np.float64)
        # a confidently wrong candidate, per row against its prompt's winner (NaN where no pair: never true)
        mas_w = np.array([winner.get(p, (np.nan, np.nan))[0] for p in uniq])[group]
        logp_w = np.array([winner.get(p, (np.nan, np.nan))[1] for p in uniq])[group]
        wrong = (mas_w - mas > self.margin) & (logp_w - logp <= self.delta)
        has_wrong = np.bincount(group[wrong], minlength=len(uniq)) > 0
        distinct = {name: _per_group_distinct(group, len(uniq), values) for name, values in (
            ("answers", table.column("text").to_pylist() if "text" in table.column_names else None),
            ("ratings", table.column("judge").to_pylist() if "judge" in table.column_names else None),
            ("mas_values", [None if m != m else round(m, 6) for m in mas]))}
        r = self.rows
        for g, p in enumerate(uniq):
            if p not in picked["m3po"]:
                continue  # no pair: not a pool the pairs come from
            for name in ("answers", "ratings", "mas_values"):
                r[name].append(int(distinct[name][g]))
            r["confidently_wrong"].append(bool(has_wrong[g]))
            for name in ("alpha0", "random"):
                if p in picked[name]:
                    r[f"differs_{name}"].append(picked[name][p][0] != picked["m3po"][p][0])
            for name in ("m3po", "alpha0", "random"):
                if p in picked[name]:
                    r[f"mas_{name}"].append(picked[name][p][1])
                    r[f"logp_{name}"].append(picked[name][p][2])

    def summary(self) -> dict[str, Any]:
        r = self.rows

        def median(k: str) -> float | None:
            return float(np.median(r[k])) if r[k] else None

        def mean(k: str) -> float | None:
            return round(float(np.mean(r[k])), 4) if r[k] else None

        return {
            "pools": len(r["answers"]), "margin": self.margin,
            "median_distinct_answers": median("answers"), "median_distinct_ratings": median("ratings"),
            "median_distinct_mas": median("mas_values"),
            "share_rejected_differs_from_alpha0": mean("differs_alpha0"),
            "share_rejected_differs_from_random": mean("differs_random"),
            "rejected_mean_mas": {k: mean(f"mas_{k}") for k in ("m3po", "alpha0", "random")},
            "rejected_mean_logp": {k: mean(f"logp_{k}") for k in ("m3po", "alpha0", "random")},
            "pools_with_confidently_wrong": int(np.sum(r["confidently_wrong"])),
        }


def describe(d: dict[str, Any]) -> list[str]:
    """The diagnostics as a few lines for the terminal and the report card."""
    if not d or not d.get("pools"):
        return []
    m = d["rejected_mean_mas"]
    lp = d["rejected_mean_logp"]
    return [
        f"pools: median {d['median_distinct_answers']:g} distinct answers, {d['median_distinct_ratings']:g} judge "
        f"ratings, {d['median_distinct_mas']:g} MAS values over {d['pools']} prompts",
        f"M3PO's rejected answer differs from alpha = 0's in {d['share_rejected_differs_from_alpha0']:.1%} of the "
        f"prompts, from vanilla DPO's draw in {d['share_rejected_differs_from_random']:.1%}",
        f"rejected answers' mean MAS / log P: M3PO {m['m3po']} / {lp['m3po']}, alpha = 0 {m['alpha0']} / "
        f"{lp['alpha0']}, vanilla DPO {m['random']} / {lp['random']}",
        f"pools holding a confidently wrong candidate (MAS more than {d['margin']:g} below the winner's, log P "
        f"within delta of it): {d['pools_with_confidently_wrong']}",
    ]


def diagnostics_table(by_seed: dict[int, dict[str, Any]]) -> list[str]:
    """Markdown: one row per seed of M3PO's cells (the pools are the run's; the seed moves vanilla DPO's draw)."""
    rows = [(seed, d) for seed, d in sorted(by_seed.items()) if d and d.get("pools")]
    if not rows:
        return []
    out = ["### What the selection did (the pools behind the pairs)", "",
           "| seed | pools | median distinct answers / ratings / MAS | rejected differs from alpha = 0 / vanilla DPO "
           "| pools with a confidently wrong candidate | rejected mean MAS: M3PO / alpha = 0 / DPO "
           "| rejected mean log P: M3PO / alpha = 0 / DPO |", "|---" * 7 + "|"]
    for seed, d in rows:
        m, lp = d["rejected_mean_mas"], d["rejected_mean_logp"]
        out.append(f"| {seed} | {d['pools']} | {d['median_distinct_answers']:g} / {d['median_distinct_ratings']:g} / "
                   f"{d['median_distinct_mas']:g} | {d['share_rejected_differs_from_alpha0']:.1%} / "
                   f"{d['share_rejected_differs_from_random']:.1%} | {d['pools_with_confidently_wrong']} | "
                   f"{m['m3po']} / {m['alpha0']} / {m['random']} | {lp['m3po']} / {lp['alpha0']} / {lp['random']} |")
    return out + [""]
