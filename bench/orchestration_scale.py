"""Orchestration at paper scale: what the fan-outs cost per shard at 30, 300 and 3,000 shards of a
stage whose shard does almost nothing (tests/noop_stage.py), and `m3po status` on a 3,000-shard run.

    python bench/orchestration_scale.py                  # sizes 30,300,3000, all three modes, status at 3,000
    python bench/orchestration_scale.py --sizes 30,300   # a quick check
    options: --modes in_process,task_worker,deployment  --status-shards N (0: skip)  --s3-rtt-ms 20
             --shards-per-run 1,16 (deployment: execution.shards_per_run values; "deployment/16" in the table)
             --process-slots 4 (the process worker's --limit)  --task-slots 8 (the task worker's)  --poll-seconds 2
             --database-url postgresql+asyncpg://prefect@127.0.0.1:5432/prefect (the server's database: an empty
             PostgreSQL one, what a pool at this size runs on; default: SQLite, Prefect's default)

All real, on loopback: a fresh `prefect server start` (its own database, its access log on), a
process worker and the noop shard deployment (deployment fan-out), a task worker serving the noop
shards (task_worker), moto's S3 server for the s3:// status. Per mode and size, one fan-out inside a
flow run, after a warm-up fan-out of 4 shards (workers started, modules imported):
  wall/shard    the fan-out's wall time / shards: submission, the shards on the workers' slots, the polls
  submit/shard  the submission's share of it
  run ovh       median over shards of (the shard's task or flow run end - start) - the shard's own work
                (its manifest record's wall_seconds; a run of several shards: shared out over them):
                the engine's cost inside a run, the figure of
                bench/orchestration_overhead.py (a deployment shard's process start comes before it)
  API/shard     HTTP requests the server logged during the fan-out (this process, the workers, the
                flow-run processes) / shards; `orch/shard`: this process's alone
  reads/poll    the orchestrator's state reads / its polls (1.0: one call per poll, whatever the shards)
`m3po status` on synthetic manifests of N shards per stage (candidates and scores; a few failed,
running, missing): the command's wall time (a fresh process) and, for reference, one stage's records
read one at a time (what `RunStore.manifest` did before); local, s3:// on moto's server (its own
process), and s3:// through a proxy that holds each request --s3-rtt-ms (an object store's round
trip, which loopback lacks: moto itself serves one request at a time, so on bare loopback reading
concurrently gains little).
Prints a table; the last line is one JSON object with every figure.
Limit: one machine: server, workers and orchestrator share its cores, and every deployment shard is a
Python process that imports Prefect, so the deployment figures are this machine's process starts.
Runs for about 1.5-2.5 h with the defaults on two cores (the deployment fan-out at 3,000 shards is most of it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # prefect_loopback: the server and workers on loopback
TINY = REPO / "tests" / "tiny.yaml"
MODES = ("in_process", "task_worker", "deployment")


def _stage_flow(overrides: list[str]):
    from prefect import flow

    from m3po.flows.machinery.fan_out import fan_out
    from noop_stage import STAGE, noop_task
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    @flow(name="bench-noop-stage", flow_run_name="bench-{run_id}")
    def bench_stage(mode: str, n: int, root: str, run_id: str, poll_seconds: float, per_run: int = 1) -> dict:
        cfg = load_config(TINY, overrides + [f"execution.shards={mode}", f"execution.poll_seconds={poll_seconds}",
                                             f"execution.shards_per_run={per_run}"])
        t0 = time.time()
        fan_out(noop_task, cfg, RunStore(root, run_id), n, "ok", STAGE, ref_name="model_ref")
        return {"t0": t0, "seconds": time.time() - t0}

    return bench_stage


def _runs(client, mode: str, run_id: str, flow_run_id) -> list:
    """The shard runs of one fan-out, read back after it (paged; not counted)."""
    from prefect.client.schemas import filters as f

    if mode == "deployment":
        read, kw = client.read_flow_runs, {"flow_run_filter": f.FlowRunFilter(tags=f.FlowRunFilterTags(all_=[f"run:{run_id}"]))}
    elif mode == "task_worker":
        # background task runs carry no tags (flows/machinery/task_worker.py): found by their name, noop-{run_id}-{shard}
        read, kw = client.read_task_runs, {"task_run_filter": f.TaskRunFilter(name=f.TaskRunFilterName(like_=f"noop-{run_id}-"))}
    else:
        read, kw = client.read_task_runs, {"flow_run_filter": f.FlowRunFilter(id=f.FlowRunFilterId(any_=[flow_run_id])),
                                           "task_run_filter": f.TaskRunFilter(name=f.TaskRunFilterName(like_="noop-shard-"))}
    out, offset = [], 0
    while True:
        page = read(**kw, limit=200, offset=offset)
        out += page
        offset += len(page)
        if len(page) < 200:
            return out


def _shards_of(run) -> list[int]:
    """The shards a run computed: its tag (`shard:N`, or `shards:A-B` for a run of several), else its name."""
    for t in run.tags:
        if t.startswith("shard:"):
            return [int(t.split(":")[1])]
        if t.startswith("shards:"):
            a, b = t.split(":")[1].split("-")
            return list(range(int(a), int(b) + 1))
    return [int(run.name.rsplit("-", 1)[1])]


def fan_out_figures(stack: dict, mode: str, n: int, poll_seconds: float, counter, per_run: int = 1) -> dict:
    from prefect.client.orchestration import get_client

    from m3po.flows.machinery import remote_shards
    from noop_stage import STAGE
    from m3po_core.store import RunStore
    from prefect_loopback import access_counts

    run_id = f"{mode.replace('_', '-')}-{n}-{int(time.time())}"
    _, log_from = access_counts(stack["server_log"])
    remote_shards.last_poll = None
    state = stack["flow"](mode=mode, n=n, root=stack["root"], run_id=run_id, poll_seconds=poll_seconds,
                          per_run=per_run if mode == "deployment" else 1, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"{mode} at {n} shards: {state}")
    timing = state.result()
    t0, t1 = timing["t0"], timing["t0"] + timing["seconds"]
    time.sleep(1.5)  # the access log's last lines
    server, _ = access_counts(stack["server_log"], log_from)
    mine = counter.by_route(t0, t1)
    entries = {e["shard"]: e for e in RunStore(stack["root"], run_id).manifest(STAGE)}
    with get_client(sync_client=True) as client:
        runs = _runs(client, mode, run_id, state.state_details.flow_run_id)
    # per shard: a run of several shards' engine cost shared out over them
    overheads = [((r.end_time - r.start_time).total_seconds() - sum(entries[s]["wall_seconds"] for s in _shards_of(r)))
                 / len(_shards_of(r)) for r in runs
                 if r.start_time and r.end_time and all(s in entries for s in _shards_of(r))]
    poll = remote_shards.last_poll
    return {"mode": mode if mode != "deployment" or per_run == 1 else f"deployment/{per_run}", "shards": n,
            "seconds": round(timing["seconds"], 2),
            "wall_per_shard": timing["seconds"] / n,
            "submit_per_shard": (poll.submitted_in / n) if poll else None,
            "run_overhead_median": statistics.median(overheads) if overheads else None,
            "runs_measured": len(overheads),
            "api_calls_per_shard": sum(server.values()) / n, "orchestrator_calls_per_shard": sum(mine.values()) / n,
            "polls": poll.polls if poll else None, "state_reads": poll.calls if poll else None,
            "reads_per_poll": (poll.calls / poll.polls) if poll and poll.polls else None,
            "server_requests": dict(server.most_common(8))}


# -- m3po status on a large synthetic run -------------------------------------------------------

def _synthetic_run(root: str, run_id: str, n: int) -> None:
    """prompts/_stage.json and the candidates and scores manifests of n shards each, written directly."""
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(f"{root.rstrip('/')}/{run_id}")
    files = {f"{base}/prompts/_stage.json": json.dumps({"n_shards": n}).encode()}
    for stage in ("candidates", "scores"):
        for i in range(n):
            if i % 500 == 7:
                rec = {"state": "failed", "error": f"OSError: image {i} unreadable"}
            elif i % 997 == 11:
                rec = {"state": "running"}
            elif i >= n - 2 and stage == "scores":
                continue  # missing
            else:
                rec = {"state": "complete", "rows": 2048, "sha256": "0" * 64, "seconds": 1.0, "finished_at": 0.0}
            files[f"{base}/{stage}/_manifest/shard-{i:05d}.json"] = json.dumps(
                {"stage": stage, "shard": i, "key": "k", **rec}).encode()
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        for path, data in files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_bytes(data)
    else:
        fs.pipe(files)  # concurrent puts


def status_figures(root: str, run_id: str, n: int, where: str) -> dict:
    """`m3po status` (a fresh process) on the synthetic run, and one stage's records read one at a
    time for reference, against the endpoint AWS_ENDPOINT_URL names now."""
    import s3fs

    from m3po_core.store import RunStore

    s3fs.S3FileSystem.clear_instance_cache()  # the endpoint may have changed
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "status", run_id, "--root", root],
                         capture_output=True, text=True, timeout=3600, cwd=REPO)
    command = time.time() - t
    if out.returncode != 0:
        raise RuntimeError(f"m3po status: {out.stderr[-2000:]}")
    store = RunStore(root, run_id)
    t = time.time()
    for f in sorted(store.fs.glob(store.path("candidates/_manifest/shard-*.json"))):
        store.fs.cat_file(f)  # one at a time: how RunStore.manifest read them before
    sequential = time.time() - t
    return {"where": where, "shards_per_stage": n, "status_command_seconds": round(command, 2),
            "output_lines": len(out.stdout.splitlines()), "one_stage_sequential_seconds": round(sequential, 2),
            "output_head": out.stdout.splitlines()[:8]}


def status_bench(work: Path, n: int, rtt_ms: float) -> list[dict]:
    """Local; s3:// on moto's server (its own process) on loopback; and the same through a proxy
    holding each request rtt_ms (an object store's round trip, which loopback lacks)."""
    import s3fs
    from flaky_s3 import FlakyS3Proxy, start_moto
    from prefect_loopback import free_port, stop

    rows = []
    _synthetic_run(str(work / "runs"), f"status-{n}", n)
    rows.append(status_figures(str(work / "runs"), f"status-{n}", n, "local"))
    moto, endpoint = start_moto("m3po-bench", free_port())
    proxy = None
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        t = time.time()
        _synthetic_run("s3://m3po-bench/runs", f"status-{n}", n)
        print(f"  {2 * n} records written to s3:// in {time.time() - t:.0f} s", flush=True)
        rows.append(status_figures("s3://m3po-bench/runs", f"status-{n}", n, "s3 loopback"))
        if rtt_ms:
            proxy = FlakyS3Proxy(endpoint)
            proxy.delay = rtt_ms / 1000
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            row = status_figures("s3://m3po-bench/runs", f"status-{n}", n, f"s3 +{rtt_ms:g}ms")
            rows.append({**row, "max_in_flight": proxy.max_in_flight})
    finally:
        if proxy is not None:
            proxy.close()
        stop(moto)
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30,300,3000")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--status-shards", type=int, default=3000)
    ap.add_argument("--process-slots", type=int, default=4)
    ap.add_argument("--task-slots", type=int, default=8)
    ap.add_argument("--poll-seconds", type=float, default=2.0)
    ap.add_argument("--shards-per-run", default="1,16",
                    help="deployment: execution.shards_per_run values to measure (default 1,16)")
    ap.add_argument("--s3-rtt-ms", type=float, default=20.0, help="the status's third row: each S3 request held this long")
    ap.add_argument("--database-url", default=os.environ.get("M3PO_BENCH_DATABASE_URL"),
                    help="the server's database, an empty PostgreSQL one, e.g. postgresql+asyncpg://prefect@127.0.0.1:5432/"
                         "prefect (default: SQLite under the bench's folder; also M3PO_BENCH_DATABASE_URL)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        ap.error(f"--modes: unknown {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="m3po-orch-scale-"))
    print(f"# figures so far in {work}/status.json and fan_out.jsonl", flush=True)
    home = work / "prefect-home"
    home.mkdir()
    # before Prefect is imported: this process and the task worker share the task-scheduling storage
    os.environ.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PYTHONUNBUFFERED": "1"})
    import prefect_loopback as pl
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import noop_stage

    database = _database_name(args.database_url)
    t_start = time.time()
    procs = []
    results, status = [], []
    try:
        server, url = pl.start_server(home, work / "server.log", args.database_url)
        procs.append(server)
        print(f"prefect server {url} on {database}; logs under {work}", flush=True)
        env = pl.worker_env(url, home)
        if "deployment" in modes:
            pl.deploy_noop(url)
            procs.append(pl.start_process_worker(env, work / "process-worker.log", args.process_slots))
        if "task_worker" in modes:
            procs.append(pl.start_task_worker(env, work / "task-worker.log", args.task_slots))
        if args.status_shards:  # first: minutes, where the deployment fan-out at 3,000 shards takes an hour
            status = status_bench(work, args.status_shards, args.s3_rtt_ms)
            (work / "status.json").write_text(json.dumps(status))
        stack = {"flow": _stage_flow(noop_stage.register()), "root": str(work / "runs"), "server_log": work / "server.log"}
        counter = pl.RequestCounter()
        with temporary_settings(updates={PREFECT_API_URL: url}), counter.counting():
            per_runs = [int(k) for k in args.shards_per_run.split(",") if k]
            for mode, per_run in [(m, k) for m in modes for k in (per_runs if m == "deployment" else [1])]:
                fan_out_figures(stack, mode, 4, args.poll_seconds, counter, per_run)  # warm-up
                for n in sizes:
                    r = fan_out_figures(stack, mode, n, args.poll_seconds, counter, per_run)
                    results.append(r)
                    with open(work / "fan_out.jsonl", "a") as out:  # kept if a later size is cut short
                        out.write(json.dumps(r) + "\n")
                    print(f"  {r['mode']:<14} {n:>5} shards  {r['seconds']:8.1f} s  wall/shard {r['wall_per_shard']:.3f} s  "
                          f"run ovh {_fmt(r['run_overhead_median'], '.3f')} s  API/shard {r['api_calls_per_shard']:.1f}  "
                          f"reads/poll {_fmt(r['reads_per_poll'], '.2f')}", flush=True)
    finally:
        for proc in reversed(procs):
            pl.stop(proc)

    print("\nfan-out       shards   wall s  wall/shard  submit/shard  run ovh  API/shard  orch/shard  polls  reads/poll")
    for r in results:
        print(f"{r['mode']:<12} {r['shards']:>7} {r['seconds']:>8.1f} {r['wall_per_shard']:>10.3f} "
              f"{_fmt(r['submit_per_shard'], '>12.3f')} {_fmt(r['run_overhead_median'], '>8.3f')} "
              f"{r['api_calls_per_shard']:>10.1f} {r['orchestrator_calls_per_shard']:>11.2f} "
              f"{_fmt(r['polls'], '>6d')} {_fmt(r['reads_per_poll'], '>11.2f')}")
    if status:
        print("\nm3po status     shards/stage  command s  output lines  one stage read one at a time, s")
        for s in status:
            print(f"{s['where']:<15} {s['shards_per_stage']:>12} {s['status_command_seconds']:>10.2f} "
                  f"{s['output_lines']:>13} {s['one_stage_sequential_seconds']:>15.2f}"
                  + (f"   (up to {s['max_in_flight']} requests in flight)" if "max_in_flight" in s else ""))
        print("\n".join("  " + line for line in status[0]["output_head"]))
    print(f"(bench wall time {time.time() - t_start:.0f} s; HTTP requests only: in-process and task-worker task "
          "runs report their states as events over one websocket per process)")
    print(json.dumps({"fan_out": results, "status": status,
                      "settings": {"process_slots": args.process_slots, "task_slots": args.task_slots,
                                   "poll_seconds": args.poll_seconds, "cpus": os.cpu_count(),
                                   "database": database}}))


def _database_name(url: str | None) -> str:
    """The database as printed: its dialect, host and name, never its credentials."""
    if not url:
        return "sqlite"
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return f"{u.get_backend_name()}://{u.host or ''}{':%s' % u.port if u.port else ''}/{u.database or ''}"


if __name__ == "__main__":
    main()
