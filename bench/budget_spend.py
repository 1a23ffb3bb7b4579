"""What reading the run's judge spend costs a scoring shard's start under a judge budget.

    python bench/budget_spend.py                      # 300 and 3,000 score records, local and s3://
    python bench/budget_spend.py --sizes 3000 --stores local

With `scoring.max_judge_requests` or `scoring.max_judge_cost` set, every scores shard (and every
adaptive round) reads the run's spend when it starts (m3po_core/scoring/budget.py). Read whole,
that is one read of every score record per shard start: n^2 reads over a stage of n shards. The
ledger lists the records and reads only those whose version changed since the process last looked.
Per size and store it prints the seconds of one spend read done both ways (every record read, as
`RunStore.manifest` does; the ledger once warm, after the shards before it), their ratio, and what a
stage of n shard starts costs the one way and the other. s3:// is moto's server on loopback (its own
process; no network round trip). Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def write_records(root: str, n: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from m3po_core.store import RunStore

    store = RunStore(root, "spend")
    usage = {"requests": 32, "prompt_tokens": 40_000, "completion_tokens": 3_000, "cost": 0.52}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: store.mark_shard("scores", s, "complete", "key", judge_usage=usage, rows=2048,
                                                 unrated=0, attempts=1), range(n)))


def measure(root: str, n: int, label: str) -> dict:
    from m3po_core.scoring.budget import run_spend
    from m3po_core.store import RunStore

    write_records(root, n)
    store = RunStore(root, "spend")
    t = time.perf_counter()
    whole = sum(e["judge_usage"]["requests"] for e in store.manifest("scores"))
    read_all = time.perf_counter() - t
    t = time.perf_counter()
    cold = run_spend(store)
    first = time.perf_counter() - t
    warm = []
    for _ in range(5):
        t = time.perf_counter()
        again = run_spend(store)
        warm.append(time.perf_counter() - t)
    assert cold["requests"] == again["requests"] == whole, "the ledger and the records disagree"
    warm_s = sorted(warm)[len(warm) // 2]
    row = {"store": label, "records": n, "read_all_s": round(read_all, 4), "ledger_first_s": round(first, 4),
           "ledger_warm_s": round(warm_s, 4), "ratio": round(read_all / warm_s, 1),
           "stage_read_all_s": round(read_all * n, 1), "stage_ledger_s": round(first + warm_s * (n - 1), 1)}
    print(f"{label:<12} {n:>6} records  every record read {read_all:8.3f} s   ledger warm {warm_s:8.4f} s "
          f"({row['ratio']:.0f}x fewer seconds; first call {first:.3f} s)   a stage of {n} shard starts: "
          f"{row['stage_read_all_s']:.0f} s against {row['stage_ledger_s']:.0f} s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="300,3000")
    p.add_argument("--stores", default="local,s3", help="local, s3 (moto on loopback) or both")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    stores = args.stores.split(",")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="m3po-spend-"))
    if "local" in stores:
        rows += [measure(str(work / f"local-{n}"), n, "local") for n in sizes]
    if "s3" in stores:
        from flaky_s3 import start_moto
        from prefect_loopback import free_port, stop

        server, _ = start_moto("m3po-bench", free_port())
        try:
            rows += [measure(f"s3://m3po-bench/spend-{n}", n, "s3 loopback") for n in sizes]
        finally:
            stop(server)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
