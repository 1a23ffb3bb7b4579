"""The report card: report.md, plots/*.png and a summary table, from what the run wrote."""
from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from m3po_core.config import RunConfig
from m3po_core.evaluation.paired import LOWER_IS_BETTER, side
from m3po_core.selection_diagnostics import describe as describe_pools
from m3po_core.scoring.budget import spend_line
from m3po_core.stages.evaluate import trained_under_its_name
from m3po_core.store import RunStore

# (label, benchmark, key path) rows of the base-vs-trained table.
HEADLINE = [
    ("POPE accuracy", "pope", ("accuracy",)),
    ("POPE precision", "pope", ("precision",)),
    ("POPE recall", "pope", ("recall",)),
    ("POPE F1", "pope", ("f1",)),
    ("POPE yes-ratio", "pope", ("yes_ratio",)),
    ("MME score", "mme", ("score",)),
    ("CHAIR_s (lower is better)", "chair", ("chair_s",)),
    ("CHAIR_i (lower is better)", "chair", ("chair_i",)),
    ("CHAIR object recall", "chair", ("recall",)),
    ("IFT prompt accuracy", "ift", ("prompt_accuracy",)),
    ("IFT constraint accuracy", "ift", ("constraint_accuracy",)),
    ("Preference accuracy (1-5)", "preference", ("accuracy",)),
    ("Preference relevance (1-5)", "preference", ("relevance",)),
    ("Preference helpfulness (1-5)", "preference", ("helpfulness",)),
]


def judge_usage_line(store: RunStore) -> str | None:
    """The model judge's requests, tokens and cost over the run's score shards (from their manifests)."""
    entries = [e.get("judge_usage") for e in store.manifest("scores") if e.get("judge_usage")]
    if not entries:
        return None
    total = {k: sum(e.get(k) or 0 for e in entries) for k in ("requests", "failed_requests", "prompt_tokens",
                                                               "completion_tokens", "cache_hits", "unrated")}
    costs = [e.get("cost") for e in entries]
    cost = f", cost {sum(costs):.2f}" if all(c is not None for c in costs) else ""
    tokens = f", {total['prompt_tokens']} prompt + {total['completion_tokens']} completion tokens" \
        if total["prompt_tokens"] or total["completion_tokens"] else ""
    return (f"- judge: {total['requests']} requests ({total['failed_requests']} failed, {total['cache_hits']} "
            f"ratings from its cache){tokens}{cost}; {total['unrated']} candidates left unrated"
            + (" (a re-run retries them)" if total["unrated"] else ""))


def _budget_set(cfg: RunConfig) -> bool:
    return cfg.scoring.max_judge_requests is not None or cfg.scoring.max_judge_cost is not None


def adaptive_line(cfg: RunConfig, store: RunStore) -> str | None:
    """How many candidates adaptive sampling drew against N for every prompt, and where prompts stopped."""
    if not cfg.sampling.adaptive:
        return None
    stopped: dict[int, int] = {}
    drawn = still_open = 0
    for e in store.manifest("candidates"):
        if "adaptive" not in e:
            continue
        drawn += e.get("rows", 0)
        still_open += e["adaptive"].get("open", 0)
        for m, count in (e["adaptive"].get("stopped_at") or {}).items():
            stopped[int(m)] = stopped.get(int(m), 0) + count
    prompts = sum(stopped.values()) + still_open
    if not prompts:
        return None
    return (f"- adaptive sampling (rounds of {cfg.sampling.round_size}): {drawn} candidates, "
            f"{drawn / (prompts * cfg.sampling.n):.2f} of N = {cfg.sampling.n} for every prompt; prompts stopped at "
            + ", ".join(f"{m}: {c}" for m, c in sorted(stopped.items()))
            + (f"; {still_open} still open at the judge budget" if still_open else ""))


def win_rate_line(metrics: dict[str, Any]) -> str | None:
    p = metrics.get("trained", {}).get("preference", {})
    if "win_rate" not in p:
        return None
    return (f"simulated preference, the trained model against the base on the same prompts (judge's overall rating): "
            f"win rate {p['win_rate']:.3f} ({p['wins']} wins, {p['ties']} ties, {p['losses']} losses; ties count half)")


def _get(d: dict[str, Any], bench: str, path: tuple[str, ...]) -> float:
    v: Any = d.get(bench, {})
    for p in path:
        v = v.get(p, float("nan")) if isinstance(v, dict) else float("nan")
    return float(v)


def filter_line(f: dict[str, Any]) -> str:
    """The quality filter's account (m3po_core/data/quality.py) for the report card."""
    return (f"- quality filter: kept {f['kept']} of {f['input']} prompts; dropped {f['instruction_length']} for "
            f"instruction length, {f['duplicate']} duplicates, {f['image_unreadable']} with unreadable images; "
            f"{f.get('text_only_records', 0)} text-only records skipped")


def comparison_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    base, trained = metrics["base"], metrics["trained"]
    labels = list(HEADLINE)
    for cat in sorted(base.get("mme", {}).get("categories", {})):
        labels.append((f"MME {cat}", "mme", ("categories", cat, "score")))
    for cat in sorted(base.get("pope", {}).get("per_category", {})):
        labels.append((f"POPE {cat} accuracy", "pope", ("per_category", cat, "accuracy")))
    for kind in sorted(base.get("ift", {}).get("by_type", {})):
        labels.append((f"IFT {kind}", "ift", ("by_type", kind)))
    intervals = metrics.get("intervals") or {}
    for label, bench, path in labels:
        b, t = _get(base, bench, path), _get(trained, bench, path)
        if bench not in base and bench not in trained:
            continue  # a benchmark the run did not ask for (CHAIR outside the graded world, say)
        ci = intervals.get(bench, {}).get(path[0]) if len(path) == 1 else None
        rows.append({"metric": label, "base": b, "trained": t, "delta": t - b, "interval": ci,
                     "lower_is_better": path[-1] in LOWER_IS_BETTER})
    return rows


def verdict(row: dict[str, Any]) -> str:
    """"better" / "worse" only where the paired 95 % interval excludes zero."""
    ci = row.get("interval")
    if ci is None:
        return ("higher" if row["delta"] > 0 else "not higher") + " (no interval)"
    word = {1: "better", -1: "worse", 0: "no clear difference"}[side(ci, bool(row.get("lower_is_better")))]
    return f"{word} (95 % interval {_signed(ci['low'])} to {_signed(ci['high'])})"


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "") + _fmt(x)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def markdown_table(rows: list[dict[str, Any]], trained: str = "trained") -> str:
    """Base against trained; with a paired 95 % interval of the delta where one was computed."""
    with_ci = any(r.get("interval") for r in rows)
    out = [f"| metric | base | {trained} | delta |" + (" 95 % interval |" if with_ci else ""),
           "| --- | ---: | ---: | ---: |" + (" ---: |" if with_ci else "")]
    for r in rows:
        ci = r.get("interval")
        interval = f" {_signed(ci['low'])} to {_signed(ci['high'])} |" if ci else " |"
        out.append(f"| {r['metric']} | {_fmt(r['base'])} | {_fmt(r['trained'])} | {_signed(r['delta'])} |"
                   + (interval if with_ci else ""))
    return "\n".join(out)


def harness_rules_table(metrics: dict[str, Any]) -> list[str]:
    """POPE and MME of both models under every public harness's scoring rule (the same predictions),
    as markdown lines; none when neither benchmark was run."""
    base, trained = metrics["base"], metrics["trained"]
    benches = [b for b in ("pope", "mme") if "rules" in base.get(b, {}) and "rules" in trained.get(b, {})]
    if not benches:
        return []
    columns = [c for c in (("POPE acc", "pope", "accuracy"), ("POPE F1", "pope", "f1"),
                           ("POPE mean F1 of splits", "pope", "mean_of_splits"), ("POPE yes-ratio", "pope", "yes_ratio"),
                           ("POPE unread", "pope", "unknown"), ("MME score", "mme", "score"),
                           ("MME unread", "mme", "unknown")) if c[1] in benches]
    first = base[benches[0]]["rules"]
    out = ["| rule | " + " | ".join(c[0] for c in columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for rule in first:
        cells = []
        for _, bench, key in columns:
            b, t = base[bench]["rules"][rule], trained[bench]["rules"][rule]
            pick = (lambda m: m[key]["f1"]) if key == "mean_of_splits" else (lambda m: m[key])
            note = " (gold)" if key == "yes_ratio" and b.get("yes_ratio_means") == "gold" else ""
            fmt = (lambda x: str(int(x))) if key == "unknown" else _fmt
            cells.append(f"{fmt(pick(b))} -> {fmt(pick(t))}{note}")
        out.append(f"| {rule} | " + " | ".join(cells) + " |")
    return ["## The same answers under each public harness's scoring rule", "",
            "Base -> trained. `default` is this project's reading (the tables above); `lmms-eval`, `vlmevalkit` "
            "(rule only, no judge) and `llava` read the same replies as those harnesses do "
            "(m3po_core/evaluation/harness_rules.py). Unread: replies the rule reads as neither yes nor no. "
            "A yes-ratio marked (gold) is lmms-eval's: the share of yes answers in the gold labels.", "",
            *out, ""]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def make_plots(store: RunStore, metrics: dict[str, Any], train_log: dict[str, Any], n_shards: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = comparison_rows(metrics)[:6]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    pope_rows = [r for r in rows if r["metric"].startswith("POPE")]
    x = np.arange(len(pope_rows))
    axes[0].bar(x - 0.2, [r["base"] for r in pope_rows], 0.4, label="base")
    axes[0].bar(x + 0.2, [r["trained"] for r in pope_rows], 0.4, label="trained")
    axes[0].set_xticks(x, [r["metric"].replace("POPE ", "") for r in pope_rows])
    axes[0].set_title("POPE (held out)")
    axes[0].legend()
    mme_rows = [r for r in comparison_rows(metrics) if r["metric"].startswith("MME ")]
    x = np.arange(len(mme_rows))
    axes[1].bar(x - 0.2, [r["base"] for r in mme_rows], 0.4, label="base")
    axes[1].bar(x + 0.2, [r["trained"] for r in mme_rows], 0.4, label="trained")
    axes[1].set_xticks(x, [r["metric"].replace("MME ", "") for r in mme_rows], rotation=20)
    axes[1].set_title("MME-style score per subtask (held out)")
    store.write_bytes("plots/base_vs_trained.png", _png(fig))
    written.append("plots/base_vs_trained.png")
    plt.close(fig)

    pair_stats = store.read_json("pairs_stats.json")
    if pair_stats.get("strategy") == "ipa":  # no MAS or log P: the rounds instead
        written.append(_ipa_rounds_plot(store, pair_stats["ipa_rounds"], plt))
    else:
        written += _pair_plots(store, n_shards, pair_stats, plt)

    hist = [h for h in train_log.get("history", []) if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] if "step" in h else i + 1 for i, h in enumerate(hist)], [h["loss"] for h in hist])
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss")
    ax.set_title("LoRA-DPO training loss")
    store.write_bytes("plots/dpo_loss.png", _png(fig))
    written.append("plots/dpo_loss.png")
    plt.close(fig)
    return written


PLOT_POINTS = 50_000


def _pair_plots(store: RunStore, n_shards: int, pair_stats: dict[str, Any], plt) -> list[str]:
    """M3PO's pairs: MAS against log P over every candidate, and the gaps of the chosen pairs."""
    import pyarrow as pa

    from m3po_core.stages.select import shard_candidates_with_scores

    pairs = store.read_table("pairs.parquet", ["mas_chosen", "mas_rejected", "logp_chosen", "logp_rejected"])
    logp_col = pair_stats.get("logp", "logp_mean")
    # an even subsample of each shard, read one shard at a time: the paper's scale has millions of candidates
    per_shard = -(-PLOT_POINTS // max(n_shards, 1))
    parts = []
    for shard in range(n_shards):
        t = shard_candidates_with_scores(store, shard, [logp_col, "mas"]).select([logp_col, "mas"])
        parts.append(t.take(np.linspace(0, t.num_rows - 1, per_shard).astype(np.int64)) if t.num_rows > per_shard else t)
    table = pa.concat_tables(parts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(table.column(logp_col).to_numpy(), table.column("mas").to_numpy(zero_copy_only=False),
               s=4, alpha=0.25, color="grey", label="candidates")
    ax.scatter(pairs.column("logp_chosen").to_numpy(), pairs.column("mas_chosen").to_numpy(), s=10,
               color="tab:green", label="chosen (argmax MAS)")
    ax.scatter(pairs.column("logp_rejected").to_numpy(), pairs.column("mas_rejected").to_numpy(), s=10,
               color="tab:red", label="rejected (argmax M3P-Score)")
    # a few very unlikely samples would squeeze the rest against the right edge, where the hard
    # negatives (confident and wrong: high log P, low MAS) are: show the central 99 % of log P
    logp = table.column(logp_col).to_numpy(zero_copy_only=False)
    if len(logp):
        left = float(np.quantile(logp, 0.01))
        span = max(float(logp.max()) - left, 1e-6)
        ax.set_xlim(left - 0.05 * span, float(logp.max()) + 0.05 * span)
        hidden = int((logp < left - 0.05 * span).sum())
        if hidden:
            ax.text(0.01, 0.01, f"{hidden} candidates with lower log P not shown", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel(f"log P ({logp_col})")
    ax.set_ylabel("MAS")
    ax.legend(fontsize=8)
    ax.set_title("Candidates: MAS against the model's confidence")
    store.write_bytes("plots/mas_vs_logp.png", _png(fig))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist(pairs.column("mas_chosen").to_numpy() - pairs.column("mas_rejected").to_numpy(), bins=30)
    axes[0].set_title("MAS gap (chosen - rejected)")
    axes[1].hist(pairs.column("logp_chosen").to_numpy() - pairs.column("logp_rejected").to_numpy(), bins=30)
    axes[1].set_title("log P gap (chosen - rejected)")
    store.write_bytes("plots/pair_stats.png", _png(fig))
    plt.close(fig)
    return ["plots/mas_vs_logp.png", "plots/pair_stats.png"]


def _ipa_rounds_plot(store: RunStore, rounds: list[dict[str, Any]], plt) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rounds))
    for offset, key, label in ((-0.27, "prompts", "prompts in"), (0.0, "pairs", "pairs"),
                               (0.27, "unresolved", "unresolved (carried on)")):
        ax.bar(x + offset, [r[key] for r in rounds], 0.27, label=label)
    ax.set_xticks(x, [f"round {r['round']}" for r in rounds])
    ax.legend(fontsize=8)
    ax.set_title("IPA: progressive preference collection")
    store.write_bytes("plots/ipa_rounds.png", _png(fig))
    plt.close(fig)
    return "plots/ipa_rounds.png"


def ipa_rounds_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Per-round statistics of IPA's progressive collection, as markdown lines."""
    origins = sorted({o for r in rounds for o in r.get("verified_rate", {})})
    out = ["| round | prompts | responses | pairs | all verified | unresolved | feedback pairs | "
           + " | ".join(f"verified {o}" for o in origins) + " |",
           "|---" * (7 + len(origins)) + "|"]
    for r in rounds:
        rates = " | ".join(f"{r['verified_rate'].get(o, float('nan')):.2f}" for o in origins)
        out.append(f"| {r['round']} | {r['prompts']} | {r['responses']} | {r['pairs']} | {r['all_verified']} | "
                   f"{r['unresolved']} | {r['feedback_pairs']} | {rates} |")
    return out


def mas_variance_shares(cfg: RunConfig, store: RunStore, n_shards: int) -> dict[str, float] | None:
    """The CLIP and judge terms' shares of the within-prompt variance of MAS over the run's rated
    candidates (m3po_core/scoring/mas.py `variance_shares`), read one score shard at a time."""
    from m3po_core.scoring.mas import variance_shares, variance_sums

    sums = np.zeros(3)
    for shard in range(n_shards):  # a prompt's candidates are all in its shard
        t = store.read_shard("scores", shard, ["prompt_id", "mas", "judge"])
        groups: dict[str, list[tuple[float, float]]] = {}
        for pid, mas, judge in zip(*(t.column(c).to_pylist() for c in ("prompt_id", "mas", "judge"))):
            if mas is not None and judge is not None and not math.isnan(mas):
                judge_part = cfg.scoring.judge_weight * judge
                groups.setdefault(pid, []).append((mas - judge_part, judge_part))  # MAS = clip term + judge term
        sums += variance_sums(list(groups.values()))
    return variance_shares(sums=sums)


def _mas_line(cfg: RunConfig, shares: dict[str, float] | None) -> list[str]:
    if shares is None:
        return []
    return [f"- what drives selection, the within-prompt variance of MAS: judge term {100 * shares['judge']:.1f} %, "
            f"CLIP term {100 * shares['clip']:.1f} %, their covariance {100 * shares['covariance']:.1f} % "
            f"(weights {cfg.scoring.clip_weight} / {cfg.scoring.judge_weight}; CLIP cosine to [0, 1] by "
            f"{cfg.scoring.cosine_mapping(cfg.scoring.clip.name)})"]


def _m3po_lines(cfg: RunConfig, info: dict[str, Any], pair_stats: dict[str, Any],
                shares: dict[str, float] | None = None) -> list[str]:
    return [
        f"- CLIP: `{cfg.scoring.clip.name}`" + (
            f", held-out retrieval top-1 {info['clip_quality']['retrieval_top1']:.2f} "
            f"(chance {info['clip_quality']['retrieval_chance']:.2f})" if info.get("clip_quality") else ""),
        f"- pairs made: {pair_stats['pairs']} of {pair_stats['groups']} prompts; skipped: "
        f"{pair_stats['skipped_no_mas_gap']} with no MAS gap, {pair_stats['skipped_too_few']} with < 2 candidates",
        f"- mean MAS gap {pair_stats['mean_mas_gap']:.3f}; mean log P gap {pair_stats['mean_logp_gap']:.3f}",
        *_mas_line(cfg, shares),
        *(f"- {line}" for line in describe_pools(pair_stats.get("diagnostics") or {}))]


def _ipa_lines(pair_stats: dict[str, Any]) -> list[str]:
    return [f"- pairs: {pair_stats['pairs']} over {len(pair_stats['ipa_rounds'])} round(s); "
            f"{pair_stats['unresolved_after_last_round']} prompts still without a verified response", "",
            "IPA rounds (verified: the share of each kind of response the verifier accepted):", "",
            *ipa_rounds_table(pair_stats["ipa_rounds"]), ""]


def build_report(cfg: RunConfig, store: RunStore, n_shards: int, info: dict[str, Any]) -> tuple[str, list[dict]]:
    """Write report.md and the plots; return the markdown and the comparison rows."""
    metrics = trained_under_its_name(store.read_json("metrics.json"))
    pair_stats = store.read_json("pairs_stats.json")
    train_log = store.read_json("train_log.json")
    rows = comparison_rows(metrics)
    plots = make_plots(store, metrics, train_log, n_shards)
    losses = [h["loss"] for h in train_log.get("history", []) if "loss" in h]
    timings = info.get("timings", {})
    total = sum(timings.values()) or float("nan")
    verdicts = [f"{r['metric']}: {verdict(r)} ({_fmt(r['base'])} -> {_fmt(r['trained'])})" for r in rows
                if r["metric"] in ("POPE accuracy", "POPE F1", "MME score", "CHAIR_s (lower is better)",
                                   "CHAIR_i (lower is better)", "IFT prompt accuracy")
                and not math.isnan(r["base"])]  # benchmarks run
    ipa_run = pair_stats.get("strategy") == "ipa"
    method = "IPA" if ipa_run else "M3PO"
    c = cfg.ipa
    md = [
        f"# {method} report card: run `{store.run_id}`",
        "",
        f"Store: `{store.url()}` - config `{cfg.name}` - " + (
            f"IPA: up to {c.rounds} rounds, {c.n_normal} + {c.n_contrastive} contrastive samples per prompt, "
            f"reviser `{c.reviser}`, verifier `{c.verifier}`" if ipa_run else
            f"strategy `{cfg.selection.strategy}` (alpha={cfg.selection.alpha}, delta={cfg.selection.delta}, "
            f"log P = {cfg.selection.logp})"),
        "",
        "**Trained vs base** (paired bootstrap over questions): " + "; ".join(verdicts),
        "",
        f"## Base model vs {method} (held-out benchmarks)",
        "",
        markdown_table(rows, trained=method.lower()),
        "",
        *([f"{line}.", ""] if (line := win_rate_line(metrics)) else []),
        *harness_rules_table(metrics),
        "## Data",
        "",
        f"- prompts: {info.get('n_prompts', '?')} in {n_shards} shards; " + (
            f"IPA samples per prompt and round: {c.n_normal} + {c.n_contrastive} contrastive" if ipa_run else
            f"candidates per prompt: {'up to ' if cfg.sampling.adaptive else ''}{cfg.sampling.n}")
        + f" (T={cfg.sampling.temperature}, top-p={cfg.sampling.top_p})",
        *([filter_line(f)] if (f := info.get("filter")) else []),
        f"- base policy: `{cfg.model.name}`" + (
            f", warm-start held-out accuracy {info['base_quality']['accuracy']:.2f} "
            f"(yes/no {info['base_quality']['yes_no_accuracy']:.2f}, chance 0.50)" if info.get("base_quality") else ""),
        *(_ipa_lines(pair_stats) if ipa_run else _m3po_lines(cfg, info, pair_stats,
                                                             mas_variance_shares(cfg, store, n_shards))),
        *([line] if (line := judge_usage_line(store)) else []),
        *([f"- {line}"] if (line := spend_line(store, cfg.scoring)) and _budget_set(cfg) else []),
        *([line] if (line := adaptive_line(cfg, store)) else []),
        (f"- DPO: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "- DPO: no steps")
        + (f"; {n} pairs longer than {train_log.get('max_length')} tokens left out (training.overlong_pairs=drop)"
           if (n := train_log.get("dropped_overlong_pairs")) else ""),
        "",
        "## Stage wall time",
        "",
        "| stage | seconds | share |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v:.1f} | {100 * v / total:.0f} % |" for k, v in timings.items()],
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]
    text = "\n".join(md)
    store.write_bytes("report.md", text.encode())
    store.write_json("report_info.json", json.loads(json.dumps(info, default=str)))
    return text, rows
