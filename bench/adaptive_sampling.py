"""Adaptive sampling against fixed N = 32 on the demo: what it saves and what it changes.

    python bench/adaptive_sampling.py                          # 3 seeds x {fixed, adaptive}, default env
    python bench/adaptive_sampling.py --envs default,threads1 --parallel 2
    python bench/adaptive_sampling.py --pools RUN_DIR          # the stopping rule on a finished fixed-N run's pools
    python bench/adaptive_sampling.py --skip-runs --control --seeds 2   # compare runs made, with the control
    python bench/adaptive_sampling.py --train-seeds 3 --envs default,threads1 --parallel 2   # + training noise

For each seed (sampling.seed, selection.seed, training.seed) and numerical environment it runs
`m3po run` twice on the demo's prompts: fixed N = 32 with per-candidate seeds
(`sampling.seeding=candidate`, so a prompt's first k candidates are the same in both) and
`sampling.adaptive=true`. It prints per run pair: candidates sampled per prompt, judge requests per
prompt (the reference judge counts one request per rating and spends no tokens; with an OpenAI
judge the same records hold its tokens), the share of fixed-N pairs that adaptive sampling chose
identically, and the trained models' benchmark differences (adaptive - fixed) with paired 95 %
bootstrap intervals over the questions (m3po_core/evaluation/paired.py). `--control` adds, per seed,
fixed N with only the training seed changed (the same candidates and pairs): how far training noise
alone moves the same differences. `--train-seeds K` trains each run's pairs K times (the run's own
model, and K - 1 `m3po experiment` cells of recipe m3po with selection/training seeds seed + 10,
seed + 20, ..., sharing the run's candidates and scores) and compares the two recipes over all of
them: a two-stage paired bootstrap over the pair sets (seeds), the training runs within each, and
the questions (`paired.group_intervals`), the interval that holds the spread over training runs.
With K > 1 `worse_beyond_interval` reads these intervals; the per-seed ones are printed beside.

`--pools RUN_DIR` reads a finished fixed-N run and replays the stopping rule on its pools cut to
their first 8, 16, 24 candidates (exact with per-candidate seeds; with batch seeds the cut pools
are samples of the same distribution): the training prompts only, which is where the rule's
defaults were chosen.

Last line: one JSON object {"candidates_ratio", "judge_requests_ratio", "same_pair_share"} (adaptive /
fixed, over every run pair), after a JSON object with every figure. Asserts nothing: it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENVS = {"default": {}, "threads1": {"OMP_NUM_THREADS": "1"},
        "portable": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}}
MODES = {"fixed": ["sampling.seeding=candidate"], "adaptive": ["sampling.adaptive=true"]}
HEADLINE = (("pope", "accuracy"), ("pope", "f1"), ("mme", "score"))


def train_seeds(seed: int, k: int) -> list[int]:
    """The extra selection/training seeds of a run's replicate cells (its own model is seed itself)."""
    return [seed + 10 * i for i in range(1, k)]


def control_id(seed: int) -> str:
    """The training-noise control: fixed N on the same candidates and pairs, another training seed."""
    return f"fixed-seed{seed}-train{seed + 1}"


def run(root: Path, env_name: str, mode: str, seed: int, k_train: int = 1) -> dict:
    run_id = f"{mode}-seed{seed}" if mode in MODES else control_id(seed)
    sets = MODES.get(mode, MODES["fixed"]) + [f"{k}.seed={seed}" for k in ("sampling", "selection")] \
        + [f"training.seed={seed if mode in MODES else seed + 1}"]
    env = {**os.environ, **ENVS[env_name], "PREFECT_HOME": tempfile.mkdtemp(prefix="m3po-bench-prefect-")}
    t0 = time.time()
    with open(root / f"{run_id}.out", "w") as out:
        rc = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--root", str(root), "--run-id", run_id,
                             *[x for s in sets for x in ("--set", s)]], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc == 0 and mode in MODES and k_train > 1:  # the replicates: selection + training + evaluation only
        extra = ",".join(map(str, train_seeds(seed, k_train)))
        with open(root / f"{run_id}-cells.out", "w") as out:
            rc = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "experiment", "--root", str(root),
                                 "--run-id", run_id, "--recipes", "m3po", "--seeds", extra,
                                 *[x for s in sets for x in ("--set", s)]], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    row = {"env": env_name, "mode": mode, "seed": seed, "rc": rc, "seconds": round(time.time() - t0, 1)}
    if rc == 0:
        row.update(drawn(root, run_id))
    print(json.dumps(row), flush=True)
    return row


def drawn(root: Path, run_id: str) -> dict:
    """Candidates, judge requests and tokens per prompt, from the run's manifest records."""
    from m3po_core.store import RunStore

    store = RunStore(str(root), run_id)
    cands = [e for e in store.manifest("candidates") if e.get("state") == "complete"]
    scores = [e for e in store.manifest("scores") if e.get("state") == "complete"]
    prompts = sum(e["rows"] for e in store.manifest("prompts"))
    usage = [e.get("judge_usage") or {} for e in scores]
    return {"prompts": prompts, "candidates_per_prompt": sum(e["rows"] for e in cands) / prompts,
            "judge_requests_per_prompt": sum(u.get("requests", 0) for u in usage) / prompts,
            "judge_tokens_per_prompt": sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
                                           for u in usage) / prompts}


def compare(root: Path, seed: int, other: str = "adaptive") -> dict:
    """`other` (adaptive, or the control) against fixed for one seed: the same pairs, and the trained
    models' paired differences (other - fixed)."""
    import pyarrow.parquet as pq

    from m3po_core.config import config_from_dict
    from m3po_core.evaluation import paired
    from m3po_core.stages.evaluate import predictions
    from m3po_core.store import RunStore

    runs = {"fixed": RunStore(str(root), f"fixed-seed{seed}"),
            "adaptive": RunStore(str(root), f"adaptive-seed{seed}" if other == "adaptive" else control_id(seed))}
    pairs = {m: {r["prompt_id"]: (r["chosen_idx"], r["rejected_idx"]) for r in
                 pq.read_table(s.path("pairs.parquet"), columns=["prompt_id", "chosen_idx", "rejected_idx"]).to_pylist()}
             for m, s in runs.items()}
    same = sum(pairs["adaptive"].get(p) == pair for p, pair in pairs["fixed"].items())
    out = {"seed": seed, "pairs_fixed": len(pairs["fixed"]), "pairs_adaptive": len(pairs["adaptive"]),
           "same_pairs": same, "same_pair_share": same / max(len(pairs["fixed"]), 1)}
    cfgs = {m: config_from_dict(s.read_json("config.json")) for m, s in runs.items()}
    for bench in paired.BENCHMARKS:
        fixed, adaptive = (predictions(cfgs[m], runs[m], bench) for m in ("fixed", "adaptive"))
        for key, iv in paired.intervals(bench, fixed, adaptive, seed=seed).items():
            out[f"{bench}_{key}"] = {k: round(iv[k], 4) for k in ("delta", "low", "high")}
    return out


def answers(root: Path, mode: str, seed: int, k_train: int) -> dict[str, list[list[dict]]]:
    """Every benchmark's answers of a run's trained models: its own, then its replicate cells'."""
    from m3po_core.config import config_from_dict
    from m3po_core.evaluation import paired
    from m3po_core.stages.evaluate import predictions
    from m3po_core.store import CellStore, RunStore

    store = RunStore(str(root), f"{mode}-seed{seed}")
    cfg = config_from_dict(store.read_json("config.json"))
    stores = [store] + [CellStore(store, f"m3po-seed{t}") for t in train_seeds(seed, k_train)]
    return {bench: [predictions(cfg, s, bench) for s in stores] for bench in paired.BENCHMARKS}


def grouped(root: Path, seeds: list[int], k_train: int) -> dict:
    """Adaptive - fixed over every trained model: pair sets (seeds) x training runs x questions."""
    from m3po_core.evaluation import paired

    from m3po_core.evaluation import mme, pope

    arms = {m: [answers(root, m, s, k_train) for s in seeds] for m in MODES}
    out = {"seeds": seeds, "train_runs_per_seed": k_train}
    score = {"pope": pope.score, "mme": mme.score}
    for m, per_seed in arms.items():  # every trained model's figures, seed by seed, training run by run
        out[m] = {f"{b}_{key}": [[round(score[b](run)[key], 4) for run in a[b]] for a in per_seed]
                  for b, key in HEADLINE}
    for bench in paired.BENCHMARKS:
        found = paired.group_intervals(bench, [a[bench] for a in arms["fixed"]], [a[bench] for a in arms["adaptive"]])
        for key, iv in found.items():
            out[f"{bench}_{key}"] = {k: round(iv[k], 4) for k in ("delta", "low", "high")}
    return out


def pools(run_dir: Path) -> dict:
    """The stopping rule replayed on a fixed-N run's pools (m3po_core/adaptive.py, the run's settings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from m3po_core.adaptive import settled
    from m3po_core.config import config_from_dict
    from m3po_core.selection import select_pairs
    from m3po_core.stages.select import shard_candidates_with_scores
    from m3po_core.store import RunStore

    store = RunStore(str(run_dir.parent), run_dir.name)
    cfg = config_from_dict(store.read_json("config.json"))
    s, sel = cfg.sampling, cfg.selection
    round_size = s.round_size
    n_shards = len(store.manifest("scores"))
    table = pa.concat_tables([shard_candidates_with_scores(store, i, ["mas", "judge", sel.logp, "perturbation"])
                              for i in range(n_shards)])
    table = table.append_column("logp", table.column(sel.logp))
    kw = dict(alpha=sel.alpha, delta=sel.delta, strategy=sel.strategy, seed=sel.seed)

    def pair_of(t: pa.Table) -> dict:
        p, _ = select_pairs(t, logp_column="logp", **kw)
        return dict(zip(p.column("prompt_id").to_pylist(), zip(p.column("chosen_idx").to_pylist(),
                                                                p.column("rejected_idx").to_pylist())))

    full = pair_of(table)
    ids = sorted(set(table.column("prompt_id").to_pylist()))
    stop: dict[str, int] = {}
    for r in range(-(-s.n // round_size)):
        end = min((r + 1) * round_size, s.n)
        cut = table.filter(pc.less(table.column("cand_idx"), end))
        done = settled(cut, rounds_done=r + 1, settle_gap=s.settle_gap, settle_rounds=s.settle_rounds, **kw)
        for p in ids:
            if p not in stop and (p in done or end >= s.n):
                stop[p] = end
    chosen = {}
    for end in sorted(set(stop.values())):
        group = pa.array([p for p in ids if stop[p] == end])
        chosen.update(pair_of(table.filter(pc.and_(pc.less(table.column("cand_idx"), end),
                                                   pc.is_in(table.column("prompt_id"), group)))))
    same = sum(chosen.get(p) == pair for p, pair in full.items())
    out = {"run": str(run_dir), "prompts": len(ids), "candidates_ratio": round(sum(stop.values()) / (s.n * len(ids)), 4),
           "pairs_fixed": len(full), "pairs_adaptive": len(chosen), "same_pair_share": round(same / max(len(full), 1), 4),
           "stopped_at": {str(m): sum(v == m for v in stop.values()) for m in sorted(set(stop.values()))},
           "rule": {"round_size": round_size, "settle_gap": s.settle_gap, "settle_rounds": s.settle_rounds}}
    print(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="./m3po-bench-adaptive")
    p.add_argument("--envs", default="default")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parallel", type=int, default=1, help="environments run side by side")
    p.add_argument("--skip-runs", action="store_true", help="compare runs already made")
    p.add_argument("--pools", type=Path, default=None, help="replay the rule on this finished fixed-N run")
    p.add_argument("--train-seeds", type=int, default=1,
                   help="training runs per pair set (the run's model + K - 1 experiment cells); K > 1: grouped intervals")
    p.add_argument("--control", action="store_true",
                   help="also fixed N with training.seed + 1 (same pairs): what training noise alone moves")
    args = p.parse_args()
    if args.pools:
        pools(args.pools.resolve())
        return
    envs, seeds = args.envs.split(","), [int(x) for x in args.seeds.split(",")]
    if unknown := sorted(set(envs) - set(ENVS)):
        sys.exit(f"unknown environment {unknown}; environments {sorted(ENVS)}")
    root = Path(args.root).resolve()
    for env_name in envs:
        (root / env_name).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if not args.skip_runs:
        def one_env(env_name: str) -> list[dict]:
            modes = [*MODES, *(["control"] if args.control else [])]
            return [run(root / env_name, env_name, mode, seed, args.train_seeds) for seed in seeds for mode in modes]

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for got in pool.map(one_env, envs):
                rows += got
    else:
        rows = [{"env": e, "mode": m, "seed": s, "rc": 0, **drawn(root / e, f"{m}-seed{s}")}
                for e in envs for s in seeds for m in MODES]
    comparisons = []
    for env_name in envs:
        for seed in seeds:
            if all(r["rc"] == 0 for r in rows if r["env"] == env_name and r["seed"] == seed):
                comparisons.append({"env": env_name, **compare(root / env_name, seed)})
                print(json.dumps(comparisons[-1]), flush=True)
    controls = []
    if args.control:
        for env_name in envs:
            for seed in seeds:
                if (root / env_name / control_id(seed) / "metrics.json").exists():
                    controls.append({"env": env_name, **compare(root / env_name, seed, other="control")})
                    print(json.dumps({"control": controls[-1]}), flush=True)
    ok = [r for r in rows if r["rc"] == 0 and r["mode"] in MODES]
    groups = []
    if args.train_seeds > 1:
        for env_name in envs:
            done = [s for s in seeds if all(r["rc"] == 0 for r in ok if r["env"] == env_name and r["seed"] == s)]
            groups.append({"env": env_name, **grouped(root / env_name, done, args.train_seeds)})
            print(json.dumps({"grouped": groups[-1]}), flush=True)

    def total(mode: str, key: str) -> float:
        return sum(r[key] * r["prompts"] for r in ok if r["mode"] == mode)

    summary = {
        "candidates_ratio": round(total("adaptive", "candidates_per_prompt") / total("fixed", "candidates_per_prompt"), 4),
        "judge_requests_ratio": round(total("adaptive", "judge_requests_per_prompt")
                                      / max(total("fixed", "judge_requests_per_prompt"), 1e-9), 4),
        "same_pair_share": round(sum(c["same_pairs"] for c in comparisons)
                                 / max(sum(c["pairs_fixed"] for c in comparisons), 1), 4)}
    judged = groups or comparisons  # with replicates, the intervals that hold the training noise
    worse = [f"{c['env']} seed {c.get('seed', 'all')}: {k}" for c in judged for b, key in HEADLINE
             if (k := f"{b}_{key}") in c and c[k]["high"] < 0]
    print(json.dumps({"rows": rows, "comparisons": comparisons, "controls": controls, "grouped": groups,
                      "worse_beyond_interval": worse}))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
