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
from typing import Any, Callable, Iterable

from m3po_core.config import RunConfig, config_from_dict
from m3po_core.evaluation.paired import LOWER_IS_BETTER as LOWER_KEYS, side

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
           ("MME score", "mme", "score"), ("CHAIR_s", "chair", "chair_s"), ("CHAIR_i", "chair", "chair_i"),
           ("IFT prompt acc", "ift", "prompt_accuracy"),
           ("IFT constraint acc", "ift", "constraint_accuracy"), ("Accuracy (1-5)", "preference", "accuracy"),
           ("Relevance (1-5)", "preference", "relevance"), ("Helpfulness (1-5)", "preference", "helpfulness"),
           ("Win rate vs base", "preference", "win_rate")]
BENCH_METRICS = ["POPE acc", "POPE F1", "POPE yes-ratio", "MME score", "CHAIR_s", "CHAIR_i", "IFT prompt acc",
                 "IFT constraint acc"]  # tables 1, 3, 5, 6 (CHAIR: lower is better)
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


COMPARATORS = ("m3po_alpha0", "dpo", "rm_dpo", "sft", "ipa", "base")
# metrics with a paired bootstrap interval over questions (m3po_core/evaluation/paired.py)
PAIRED = (("POPE acc", "pope", "accuracy"), ("POPE F1", "pope", "f1"), ("MME score", "mme", "score"),
          ("CHAIR_s", "chair", "chair_s"), ("CHAIR_i", "chair", "chair_i"))
LOWER_IS_BETTER = tuple(label for label, _, key in PAIRED if key in LOWER_KEYS)


def paired_rows(cells: list[Cell], read_predictions: Callable[[str, str], list[dict] | None]) -> list[dict[str, Any]]:
    """M3PO against each comparator, seed by seed: paired bootstrap 95 % intervals over questions of
    (M3PO - comparator), from both cells' answers to the same questions. `read_predictions(cell_id,
    bench)` gives a cell's answers ("base": the base model's), or None where there are none."""
    from m3po_core.evaluation import paired

    answers: dict[tuple[str, str], list[dict] | None] = {}  # each cell is compared several times: read once

    def read(cell_id: str, bench: str) -> list[dict] | None:
        if (cell_id, bench) not in answers:
            answers[cell_id, bench] = read_predictions(cell_id, bench)
        return answers[cell_id, bench]

    by_id = {c.cell_id: c for c in cells}
    ours = sorted((c for c in cells if c.recipe == "m3po" and c.alpha is None and c.delta is None), key=lambda c: c.seed)
    rows = []
    for other in COMPARATORS:
        for cell in ours:
            theirs = "base" if other == "base" else Cell(other, cell.seed).cell_id
            if theirs != "base" and theirs not in by_id:
                continue
            for bench in sorted({b for _, b, _ in PAIRED}):
                a, b = read(theirs, bench), read(cell.cell_id, bench)
                if a is None or b is None:
                    continue
                found = paired.intervals(bench, a, b, seed=cell.seed)
                rows += [{"comparator": other, "seed": cell.seed, "metric": label, **found[key]}
                         for label, bench_of, key in PAIRED if bench_of == bench]
    return rows


def _digits(metric: str) -> int:
    return 1 if metric.startswith("MME") else 2 if "(1-5)" in metric else 3


def interval_verdicts(paired: list[dict[str, Any]]) -> list[str]:
    """'beats' / 'loses to' only where every seed's interval excludes zero on that side."""
    out = []
    for other in COMPARATORS:
        for metric, _, _ in PAIRED:
            found = sorted((r for r in paired if r["comparator"] == other and r["metric"] == metric),
                           key=lambda r: r["seed"])
            if not found:
                continue
            d = _digits(metric)
            sides = [side(r, metric in LOWER_IS_BETTER) for r in found]  # CHAIR: below zero is M3PO's gain
            above, below = sides.count(1), sides.count(-1)
            word = "beats" if above == len(found) else "loses to" if below == len(found) else "does not clearly beat"
            mean, sd = mean_sd([r["delta"] for r in found])
            spans = ", ".join(f"[{r['low']:+.{d}f}, {r['high']:+.{d}f}]" for r in found)
            out.append(f"- M3PO {word} {LABELS[other]} on {metric}: difference {mean:+.{d}f} ± {sd:.{d}f} over "
                       f"{len(found)} seed(s); 95 % intervals over questions, seed by seed: {spans} "
                       f"({above} in M3PO's favour, {below} against)")
    return out


def verdicts(rows: list[dict[str, Any]], recipes: list[str], paired: list[dict[str, Any]] | None = None) -> list[str]:
    """Plain statements. Metrics with paired intervals (`paired_rows`) get a verdict from them
    (`interval_verdicts`); the others are compared seed by seed and get no verdict word."""
    if "m3po" not in recipes:
        return []
    out = interval_verdicts(paired or [])
    with_intervals = {r["metric"] for r in paired or []}
    for other in [r for r in COMPARATORS if r in recipes or r == "base"]:
        for metric in ("POPE acc", "MME score", "IFT prompt acc", "Accuracy (1-5)"):
            if metric in with_intervals:
                continue
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
            d = _digits(metric)
            out.append(f"- M3PO against {LABELS[other]} on {metric}: difference {mean:+.{d}f} ± {sd:.{d}f} "
                       f"(ahead on {sum(x > 0 for x in diffs)} of {len(diffs)} seeds; no paired interval, so no verdict)")
    return out


def cell_answers(cfg: RunConfig, store, cell_id: str, bench: str) -> list[dict[str, Any]] | None:
    """A cell's (or the base model's) cached answers to a benchmark; None where it has none."""
    from m3po_core.stages.evaluate import predictions
    from m3po_core.store import CellStore

    if bench not in cfg.evaluation.benchmarks:
        return None
    try:
        if cell_id == "base":
            return predictions(cfg, store, bench, "base")
        return predictions(cfg, CellStore(store, cell_id), bench, "trained")
    except (FileNotFoundError, RuntimeError):  # not evaluated (or not completely): no interval
        return None


def sweep_plots(store, rows: list[dict[str, Any]], alphas: list[float], deltas: list[float]) -> list[str]:
    """One plot per sweep: each metric against the swept value, mean with sd bars over seeds."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, values in (("alpha", alphas), ("delta", deltas)):
        if not values:
            continue
        metrics = [c[0] for c in COLUMNS if c[0] in ("POPE acc", "MME score")]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2))
        for ax, metric in zip(axes, metrics):
            means, sds = [], []
            for v in values:
                vals = [r["value"] for r in rows if r["metric"] == metric and r[name] == v]
                m, s = mean_sd(vals) if vals else (float("nan"), 0.0)
                means.append(m)
                sds.append(s)
            ax.errorbar(values, means, yerr=sds, marker="o", capsize=3)
            ax.set_xlabel(name)
            ax.set_title(metric)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        rel = f"experiment/{name}_sweep.png"
        store.write_bytes(rel, buf.getvalue())
        written.append(rel.split("/", 1)[1])
    return written
