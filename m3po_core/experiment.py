"""The paper's experiments as a grid over one run's candidates and scores.

A cell is (recipe, seed) or a sweep point (alpha or delta of M3PO, seed). Every cell re-runs only
selection, training and evaluation (`CellStore`); sampling, scoring and the base model's
evaluation are computed once for the run. Tables follow the paper's layouts:

    table 1  methods: base, SFT, vanilla DPO, RM-DPO, M3PO       (mean +- sd over seeds)
    table 3  M3PO against M3PO with alpha = 0
    table 5  alpha sweep of M3PO            table 6  delta sweep of M3PO

Recipes (what each baseline means here):
    base         the policy before training (evaluated once)
    sft          supervised fine-tuning on the M3PO-preferred responses only (TRL loss "sft")
    dpo          vanilla DPO: R_w by MAS, R_l uniformly among the worse candidates (strategy random)
    rm_dpo       RM-DPO: the best against the worst by a reward model's score alone (the judge's)
    m3po         eq. 1-3 with the configuration's alpha and delta
    m3po_alpha0  the ablation of table 3: alpha = 0 (the lowest-MAS candidate)
    ipa          the second method (m3po_core/ipa.py) on the same prompts: its own rounds of sampling,
                 revision and verification in the cell (seeded by the cell's seed), then the same
                 training and benchmarks; it shares no candidates with M3PO
A simulated RLHF (PPO) baseline is not offered: TRL 1.x has no PPO trainer for vision-language
models, and an online-RL recipe would not share the cached candidates that make the grid cheap.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from m3po_core.config import RunConfig, config_from_dict

RECIPES: dict[str, dict[str, Any] | None] = {
    "base": None,
    "sft": {"selection": {"strategy": "m3po"}, "training": {"loss_type": ["sft"], "loss_weights": None}},
    "dpo": {"selection": {"strategy": "random"}},
    "rm_dpo": {"selection": {"strategy": "rm_best_worst"}},
    "m3po": {"selection": {"strategy": "m3po"}},
    "m3po_alpha0": {"selection": {"strategy": "mas_gap"}},
    "ipa": {},
}
LABELS = {"base": "Base model", "sft": "SFT (preferred responses)", "dpo": "Vanilla DPO", "rm_dpo": "RM-DPO",
          "m3po": "M3PO", "m3po_alpha0": "M3PO (alpha = 0)", "ipa": "IPA"}
# (column label, benchmark, metric key) of the tables
COLUMNS = [("POPE acc", "pope", "accuracy"), ("POPE F1", "pope", "f1"), ("POPE yes-ratio", "pope", "yes_ratio"),
           ("MME score", "mme", "score"), ("IFT prompt acc", "ift", "prompt_accuracy"),
           ("IFT constraint acc", "ift", "constraint_accuracy"), ("Accuracy (1-5)", "preference", "accuracy"),
           ("Relevance (1-5)", "preference", "relevance"), ("Helpfulness (1-5)", "preference", "helpfulness"),
           ("Win rate vs base", "preference", "win_rate")]
BENCH_METRICS = ["POPE acc", "POPE F1", "POPE yes-ratio", "MME score", "IFT prompt acc",
                 "IFT constraint acc"]  # tables 1, 3, 5, 6
PREFERENCE_METRICS = ["Accuracy (1-5)", "Relevance (1-5)", "Helpfulness (1-5)", "Win rate vs base"]  # table 4


@dataclasses.dataclass(frozen=True)
class Cell:
    recipe: str
    seed: int
    alpha: float | None = None     # sweep points of M3PO
    delta: float | None = None

    @property
    def cell_id(self) -> str:
        sweep = f"-alpha{self.alpha:g}" if self.alpha is not None else f"-delta{self.delta:g}" if self.delta is not None else ""
        return f"{self.recipe}{sweep}-seed{self.seed}"


def grid(recipes: Iterable[str], seeds: Iterable[int], alphas: Iterable[float] = (),
         deltas: Iterable[float] = ()) -> list[Cell]:
    recipes, seeds = list(recipes), list(seeds)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; available: {', '.join(RECIPES)}")
    if not seeds:
        raise ValueError("an experiment needs at least one seed")
    cells = [Cell(r, s) for r in recipes if r != "base" for s in seeds]
    cells += [Cell("m3po", s, alpha=a) for a in alphas for s in seeds]
    cells += [Cell("m3po", s, delta=d) for d in deltas for s in seeds]
    return cells


def cell_config(cfg: RunConfig, cell: Cell) -> RunConfig:
    """The run configuration with the recipe's selection/training settings and the cell's seed."""
    tree = cfg.to_dict()
    for section, values in (RECIPES[cell.recipe] or {}).items():
        tree[section].update(values)
    tree["training"]["seed"] = cell.seed
    tree["selection"]["seed"] = cell.seed
    tree["ipa"]["seed"] = cell.seed
    if cell.alpha is not None:
        tree["selection"]["alpha"] = cell.alpha
    if cell.delta is not None:
        tree["selection"]["delta"] = cell.delta
    return config_from_dict(tree)


def result_rows(cell: Cell | None, metrics: dict[str, Any], pair_stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Long-format rows (one per metric) of one cell, or of the base model (cell None)."""
    rows = []
    for label, bench, key in COLUMNS:
        value = metrics.get(bench, {}).get(key)
        if value is None:
            continue
        rows.append({"recipe": cell.recipe if cell else "base", "seed": cell.seed if cell else None,
                     "alpha": cell.alpha if cell else None, "delta": cell.delta if cell else None,
                     "cell_id": cell.cell_id if cell else "base", "metric": label, "value": float(value),
                     "pairs": (pair_stats or {}).get("pairs")})
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def _fmt(values: list[float], metric: str) -> str:
    if not values:
        return "n/a"
    mean, sd = mean_sd(values)
    digits = 1 if metric.startswith("MME") else 2 if "(1-5)" in metric else 3
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _values(rows, metric, **match) -> list[float]:
    return [r["value"] for r in rows if r["metric"] == metric and all(r[k] == v for k, v in match.items())]


def _table(title: str, header: str, lines: list[tuple[str, dict[str, Any]]], rows, metrics) -> list[str]:
    out = [f"### {title}", "", f"| {header} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, match in lines:
        out.append(f"| {label} | " + " | ".join(_fmt(_values(rows, m, **match), m) for m in metrics) + " |")
    return out + [""]


def tables(rows: list[dict[str, Any]], recipes: list[str], alphas: list[float], deltas: list[float],
           n_seeds: int) -> str:
    """The paper's table layouts, mean ± sd over seeds, as markdown."""
    present = {r["metric"] for r in rows}
    metrics = [m for m in BENCH_METRICS if m in present]
    pref = [m for m in PREFERENCE_METRICS if m in present]
    plain = dict(alpha=None, delta=None)
    out = [f"Mean ± sample sd over {n_seeds} seed(s) (training and selection seed; the base model has no seed).", ""]
    t1 = [r for r in ("base", "sft", "dpo", "rm_dpo", "m3po", "ipa") if r in recipes or r == "base"]
    out += _table("Table 1: M3PO against the baselines", "Method",
                  [(LABELS[r], {"recipe": r, **plain}) for r in t1], rows, metrics)
    if "m3po_alpha0" in recipes and "m3po" in recipes:
        out += _table("Table 3: ablation of the confidence term", "Method",
                      [(LABELS[r], {"recipe": r, **plain}) for r in ("m3po", "m3po_alpha0")], rows, metrics)
    if pref:
        out += _table("Table 4: simulated human preference (judge ratings 1-5; win rate against the base, ties half)",
                      "Method", [(LABELS[r], {"recipe": r, **plain}) for r in t1 + ["m3po_alpha0"]
                                 if r in t1 or r in recipes], rows, pref)
    if alphas:
        out += _table("Table 5: alpha sweep (M3PO)", "alpha",
                      [(f"{a:g}", {"recipe": "m3po", "alpha": a, "delta": None}) for a in alphas], rows, metrics)
    if deltas:
        out += _table("Table 6: delta sweep (M3PO)", "delta",
                      [(f"{d:g}", {"recipe": "m3po", "delta": d, "alpha": None}) for d in deltas], rows, metrics)
    return "\n".join(out)


def verdicts(rows: list[dict[str, Any]], recipes: list[str]) -> list[str]:
    """Plain statements: does M3PO beat each comparator, per metric, seed by seed (paired on the
    seed; the base model is one number)? 'beats' only when it is ahead on every seed."""
    out = []
    if "m3po" not in recipes:
        return out
    plain = dict(alpha=None, delta=None)
    for other in [r for r in ("m3po_alpha0", "dpo", "rm_dpo", "sft", "ipa", "base") if r in recipes or r == "base"]:
        for metric in ("POPE acc", "MME score", "IFT prompt acc", "Accuracy (1-5)"):
            ours = {r["seed"]: r["value"] for r in rows if r["recipe"] == "m3po" and r["metric"] == metric
                    and r["alpha"] is None and r["delta"] is None}
            if other == "base":
                base = _values(rows, metric, recipe="base")
                theirs = {s: base[0] for s in ours} if base else {}
            else:
                theirs = {r["seed"]: r["value"] for r in rows if r["recipe"] == other and r["metric"] == metric
                          and r["alpha"] is None and r["delta"] is None}
            seeds = sorted(set(ours) & set(theirs))
            if not seeds:
                continue
            diffs = [ours[s] - theirs[s] for s in seeds]
            mean, sd = mean_sd(diffs)
            wins = sum(d > 0 for d in diffs)
            word = "beats" if wins == len(diffs) else "loses to" if wins == 0 and all(d < 0 for d in diffs) \
                else "does not clearly beat"
            digits = 1 if metric.startswith("MME") else 2 if "(1-5)" in metric else 3
            out.append(f"- M3PO {word} {LABELS[other]} on {metric}: difference {mean:+.{digits}f} ± {sd:.{digits}f} "
                       f"(ahead on {wins} of {len(diffs)} seeds)")
    return out
