"""Every demo figure the README and docs/demo.md quote, from one command: the quick start (`m3po run`) in each world,
numerical environment and seed, the experiment tables of both worlds, and IPA's rounds.

    python bench/demo_figures.py                                  # everything (about 2 h on 2 cores)
    python bench/demo_figures.py --envs default --seeds 0         # the quick start as a fresh clone runs it
    python bench/demo_figures.py --skip-runs --experiment         # tables from runs already made

Numerical environments stand in for other CPUs (the float path: thread count, vector kernels):
    default    the machine's own kernels, its cores
    threads1   OMP_NUM_THREADS=1
    portable   OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default (no AVX2/AVX-512 kernels)
A seed is the method's: sampling.seed, selection.seed and training.seed (the world and the carried
base model stay fixed, m3po_core/stages/carried.py). Each environment gets its own root (nothing is
shared between them but the carried models) and each run a fresh PREFECT_HOME. Environments run
side by side with --parallel (the one-thread ones use one core each); wall times are then not
comparable, so the quick start's time is measured with `--envs default --parallel 1` alone.

Prints one line per run and, last, one JSON object with every figure (also written to --out).
Asserts nothing: it measures.
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
ENVS = {"default": {}, "threads1": {"OMP_NUM_THREADS": "1"},
        "portable": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}}
WORLDS = {"demo": [], "control": ["data.world.answer_bias=0"]}
HEADLINE = (("pope", "accuracy"), ("pope", "f1"), ("mme", "score"))


def _cli(args: list[str], env_name: str, log: Path) -> tuple[int, float]:
    env = {**os.environ, **ENVS[env_name], "PREFECT_HOME": tempfile.mkdtemp(prefix="m3po-bench-prefect-")}
    t0 = time.time()
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "m3po.flows.cli", *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


def _sets(world: str, seed: int) -> list[str]:
    sets = WORLDS[world] + [f"{k}.seed={seed}" for k in ("sampling", "selection", "training")]
    return [x for s in sets for x in ("--set", s)]


def quick_start(root: Path, env_name: str, world: str, seed: int) -> dict:
    run_id = f"{world}-seed{seed}"
    env_root = root / env_name
    env_root.mkdir(parents=True, exist_ok=True)
    rc, seconds = _cli(["run", "--root", str(env_root), "--run-id", run_id, *_sets(world, seed)], env_name,
                       env_root / f"{run_id}.out")
    row = {"env": env_name, "world": world, "seed": seed, "rc": rc, "seconds": round(seconds, 1)}
    if rc == 0:
        metrics = json.loads((env_root / run_id / "metrics.json").read_text())
        for bench, key in HEADLINE:
            name = f"{bench}_{key}"
            row[f"base_{name}"] = metrics["base"][bench][key]
            row[f"trained_{name}"] = metrics["trained"][bench][key]
            iv = metrics["intervals"][bench][key]
            row[f"interval_{name}"] = [round(iv["low"], 4), round(iv["high"], 4)]
        row["better_on_all"] = all(row[f"interval_{b}_{k}"][0] > 0 for b, k in HEADLINE)
        # the same answers as each public harness reads them (m3po_core/evaluation/harness_rules.py)
        row["rules"] = {rule: {f"{side}_{bench}_{key}": round(metrics[side][bench]["rules"][rule][key], 4)
                               for side in ("base", "trained") for bench, key in HEADLINE}
                        for rule in metrics["base"]["pope"].get("rules", {})}
        # what the selection did on the pools (m3po_core/selection_diagnostics.py)
        row["selection"] = json.loads((env_root / run_id / "pairs_stats.json").read_text()).get("diagnostics")
    print(json.dumps(row), flush=True)
    return row


def experiment(root: Path, world: str, seeds: list[int], env_name: str) -> dict:
    """`m3po experiment` on the world's seed-0 run of `env_name` (its samples are reused)."""
    env_root = root / env_name
    run_id = f"{world}-seed{seeds[0]}"
    rc, seconds = _cli(["experiment", "--root", str(env_root), "--run-id", run_id,
                        "--seeds", ",".join(map(str, seeds)), *_sets(world, seeds[0])],
                       env_name, env_root / f"{run_id}-experiment.out")
    tables = env_root / run_id / "experiment" / "tables.md"
    out = {"world": world, "env": env_name, "rc": rc, "seconds": round(seconds, 1)}
    if rc == 0:
        out["tables"] = str(tables)
        out["verdicts"] = [line for line in tables.read_text().splitlines() if line.startswith("- M3PO ")]
    print(json.dumps(out), flush=True)
    return out


def ipa_rounds(root: Path, env_name: str) -> dict:
    env_root = root / env_name
    env_root.mkdir(parents=True, exist_ok=True)
    rc, seconds = _cli(["ipa", "--root", str(env_root), "--run-id", "demo-ipa"], env_name, env_root / "demo-ipa.out")
    out = {"env": env_name, "rc": rc, "seconds": round(seconds, 1)}
    if rc == 0:
        run = env_root / "demo-ipa"
        out["rounds"] = json.loads((run / "pairs_stats.json").read_text()).get("ipa_rounds")
        metrics = json.loads((run / "metrics.json").read_text())
        out["intervals"] = metrics.get("intervals")
        out.update({f"{side}_{b}_{k}": metrics[side][b][k] for side in ("base", "trained") for b, k in HEADLINE})
    print(json.dumps(out), flush=True)
    return out


def spread(rows: list[dict]) -> dict:
    """Per world: the base's POPE accuracy range over environments, and each headline delta's range."""
    out = {}
    for world in sorted({r["world"] for r in rows}):
        ok = [r for r in rows if r["world"] == world and r["rc"] == 0]
        if not ok:
            continue
        base = [r["base_pope_accuracy"] for r in ok]
        out[world] = {"runs": len(ok), "better_on_all": sum(r["better_on_all"] for r in ok),
                      "base_pope_accuracy_range": [min(base), max(base)]}
        for bench, key in HEADLINE:
            deltas = [r[f"trained_{bench}_{key}"] - r[f"base_{bench}_{key}"] for r in ok]
            out[world][f"delta_{bench}_{key}_range"] = [round(min(deltas), 4), round(max(deltas), 4)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="./m3po-bench-runs")
    p.add_argument("--envs", default="default,threads1,portable")
    p.add_argument("--worlds", default="demo,control")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parallel", type=int, default=1, help="environments run side by side")
    p.add_argument("--skip-runs", action="store_true", help="no quick-start runs (read nothing new)")
    p.add_argument("--experiment", action="store_true", help="`m3po experiment` per world on the first env")
    p.add_argument("--ipa", action="store_true", help="`m3po ipa` on the first env (IPA's rounds)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    root = Path(args.root).resolve()
    envs, worlds = args.envs.split(","), args.worlds.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(envs) - set(ENVS)) + sorted(set(worlds) - set(WORLDS))
    if unknown:
        sys.exit(f"unknown environment or world: {unknown}; environments {sorted(ENVS)}, worlds {sorted(WORLDS)}")
    result: dict = {"rows": []}
    if not args.skip_runs:
        def one_env(env_name: str) -> list[dict]:  # runs of one environment in turn (they share its root)
            return [quick_start(root, env_name, w, s) for w in worlds for s in seeds]

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for rows in pool.map(one_env, envs):
                result["rows"] += rows
        result["spread"] = spread(result["rows"])
    if args.experiment:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            result["experiments"] = list(pool.map(lambda w: experiment(root, w, seeds, envs[0]), worlds))
    if args.ipa:
        result["ipa"] = ipa_rounds(root, envs[0])
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
