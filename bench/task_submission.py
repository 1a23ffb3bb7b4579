"""What submitting one shard to the task-worker fan-out costs this process: the CPU time of
creating N background task runs (`flows/machinery/task_submission.delay_all`) with the run context
serialized once per fan-out against Prefect's once per run, on a fresh `prefect server start`
(its own process, so its CPU is not counted here).

    python bench/task_submission.py [--shards 100] [--repeats 3]

Prints CPU ms per shard for both and their ratio; the last line is one JSON object.
Limit: the wall time also holds the server's answer, which this does not improve.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import prefect_loopback as pl

    work = Path(tempfile.mkdtemp(prefix="m3po-submit-"))
    server, url = pl.start_server(work / "home", work / "server.log")
    os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(work / "home"))
    try:
        out = json.loads(_measure(args.shards, args.repeats))
    finally:
        pl.stop(server)
    for mode in ("per_run", "once"):
        print(f"{mode:>8}: {out[mode]['cpu_ms_per_shard']:7.1f} ms CPU, {out[mode]['wall_ms_per_shard']:7.1f} ms wall per shard")
    out["cpu_ratio"] = round(out["per_run"]["cpu_ms_per_shard"] / out["once"]["cpu_ms_per_shard"], 2)
    print(f"CPU per shard, per-run context / once: {out['cpu_ratio']}x")
    print(json.dumps(out))


def _measure(n: int, repeats: int) -> str:
    from prefect import flow
    from prefect.utilities.asyncutils import run_coro_as_sync

    import noop_stage
    from m3po.flows.machinery.task_submission import delay_all
    from m3po_core.config import load_config

    cfg = load_config(REPO / "tests" / "tiny.yaml", noop_stage.register() + ["execution.shards=task_worker"])

    @flow(name="bench-task-submission")
    def bench() -> dict:
        params = [{"config": cfg.to_dict(), "root": "/tmp/none", "run_id": "bench", "shard": s, "model_ref": "ok"}
                  for s in range(n)]
        run_coro_as_sync(delay_all(noop_stage.noop_shard_job, params[:2], [[]] * 2))  # warm: client, storage
        out = {}
        for mode, once in (("per_run", False), ("once", True)):
            cpu, wall = [], []
            for _ in range(repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                run_coro_as_sync(delay_all(noop_stage.noop_shard_job, params, [[]] * n, context_once=once))
                cpu.append((time.process_time() - c0) / n * 1000)
                wall.append((time.perf_counter() - w0) / n * 1000)
            out[mode] = {"cpu_ms_per_shard": round(statistics.median(cpu), 1),
                         "wall_ms_per_shard": round(statistics.median(wall), 1), "cpu_ms_all": [round(c, 1) for c in cpu]}
        return out

    return json.dumps(bench())


if __name__ == "__main__":
    main()
