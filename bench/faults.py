"""The fault matrix: every way the cache could serve a stale result or lose a finished one, done for
real to a finished run, with what was kept, what was computed again (against what must be), what
was refused and the message.

    python bench/faults.py            # every row, about 8-12 minutes on two cores
    python bench/faults.py --quick    # without the two rows that need a Prefect server and workers

Rows run in this process (tests/fault_rows.py, each also a test in tests/test_fault_matrix.py):
input changes (an image replaced, an instruction edited, a reference out of its root, a
decompression bomb), a damaged shard in the store, S3 faults on loopback (moto behind a proxy that
answers 503 SlowDown, drops connections, or goes away), a write that fails mid-file (a file-size
limit: the EFBIG a full disk's ENOSPC stands for), a judge whose key is revoked on a retry.
Rows with processes: a task worker SIGKILLed mid-shard (tests/test_leases.py), `m3po run` SIGKILLed
while sampling (tests/test_pipeline.py, tests/test_no_orphans.py), and a bad argument
(tests/test_cli_args.py).
Prints the table, then one JSON object with every row, and ends with the line `0 rows lost` when
nothing finished was lost (otherwise `N rows lost`; exit status 1 if any row differs from what it
must show).
Limit: one machine, the tiny models; the object store is moto's server, not a real S3.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the rows, the loopback judge, S3 proxy and Prefect helpers


def s3_proxy():
    """moto's S3 server on loopback, with a bucket, behind the proxy that fails requests on demand."""
    import boto3
    import s3fs
    from flaky_s3 import FlakyS3Proxy
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-SECRET",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"})
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="m3po")
    proxy = FlakyS3Proxy(f"http://{host}:{port}")
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    s3fs.S3FileSystem.clear_instance_cache()
    return server, proxy


def in_process_rows(work: Path) -> list[dict]:
    import fault_rows

    judge = fault_rows.judge_server()
    server, proxy = s3_proxy()
    rows = []
    try:
        for name, (fn, needs_s3, expect) in fault_rows.ROWS.items():
            t0 = time.time()
            row = fn(work / f"row-{len(rows)}", proxy if needs_s3 else str(work / "store"), judge)
            problems = fault_rows.check(name, row)
            if "message" in row:
                row["message"] = row["message"].replace(f"{work}/", "")  # the bench's own folder: not news
            rows.append({"fault": name, **row, "expected": expect["recomputed"], "problems": problems,
                         "seconds": round(time.time() - t0, 1)})
            print(f"# {name}: {'as expected' if not problems else problems} ({rows[-1]['seconds']} s)", flush=True)
    finally:
        judge.stop()
        proxy.close()
        server.stop()
    return rows


def killed_worker_row(work: Path) -> dict:
    """Two task workers serve a 6-shard stage; the one that takes shard 2 is SIGKILLed in it."""
    work.mkdir(parents=True, exist_ok=True)
    import prefect_loopback as pl

    home = work / "prefect-home"
    server, url = pl.start_server(home, work / "server.log")
    env = pl.worker_env(url, home)
    workers = [pl.start_task_worker(env, work / f"task-worker-{i}.log", 2) for i in range(2)]
    try:
        t0 = time.time()
        out = subprocess.run([sys.executable, __file__, "_lease", str(work / "store")], env=env,
                             capture_output=True, text=True, timeout=900)
        killed = [w.returncode for w in workers if w.poll() is not None]
        result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    finally:
        for w in workers:
            pl.stop(w)
        pl.stop(server)
    complete = result.get("complete", 0)
    # A Prefect task worker takes a run off the server's queue before it waits for a free slot
    # (prefect/task_worker.py: the subscription hands it the run, then `_acquire_token`), so a worker
    # with 2 slots holds up to 3 runs: 2 running and 1 taken but not started. Each is given up
    # (lease lapsed, or still Scheduled/Pending on the server: a task worker's Running state reaches
    # the server as an event, so a run killed early can still read Pending) and submitted again;
    # nothing the worker finished is.
    lapsed, stalled = result.get("lapsed", 0), result.get("stalled", 0)
    row = {"fault": "task worker SIGKILLed mid-shard",
           "recomputed": {"noop": f"{result.get('resubmitted')} runs again ({lapsed} lease lapsed, {stalled} never seen "
                                  f"running); {result.get('computed_twice')} shards computed twice"},
           "expected": {"noop": "the runs the killed worker held (<= its 2 slots + 1 taken off the queue); 0 twice"},
           "rows_before": 6,
           "rows_lost": 6 - complete, "half_written": 0, "workers_killed": killed,
           "message": (out.stderr.strip().splitlines() or [""])[-1][:160] if out.returncode else
           f"the killed worker's runs given up and submitted again; stage complete in {time.time() - t0:.0f} s"}
    resubmitted = result.get("resubmitted")
    ok = (out.returncode == 0 and complete == 6 and killed == [-9] and resubmitted is not None
          and 1 <= resubmitted <= 3 and lapsed + stalled == resubmitted and result.get("computed_twice") == 0)
    row["problems"] = [] if ok else [f"exit {out.returncode}, complete {complete}, killed {killed}, "
                                     f"resubmitted {resubmitted}, computed twice {result.get('computed_twice')}: {out.stderr[-500:]}"]
    return row


def _lease_child(root: str) -> None:
    import noop_stage
    from m3po_core.store import RunStore
    from test_leases import lease_flow

    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType

    state = lease_flow(n=6, ref="crash-once:2", root=root, run_id="killed", lease=4.0, return_state=True)
    entries = RunStore(root, "killed").manifest(noop_stage.STAGE)
    # a shard submitted again: its first task run was marked Crashed when its lease lapsed (this
    # server is the bench's own: every crashed run is one of these)
    with get_client(sync_client=True) as client:
        crashed = client.read_task_runs(task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["CRASHED"]), name=None)))
    why = [r.state.message or "" for r in crashed]  # remote_shards says why it gave each run up
    computed = [name.split("-")[0] for name in os.listdir(RunStore(root, "killed").path(f"{noop_stage.STAGE}/computed"))]
    print(json.dumps({"completed": state.is_completed(), "resubmitted": len(crashed),
                      "lapsed": sum("lease" in m for m in why), "stalled": sum("still" in m for m in why),
                      "complete": sum(e["state"] == "complete" for e in entries),
                      "computed_twice": len(computed) - len(set(computed))}))


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def killed_run_row(work: Path) -> dict:
    """`m3po run` (its own Prefect API server, no PREFECT_API_URL) SIGKILLed once a candidates shard
    is published; then `m3po rerun-failed`. Every process the run started must be gone, the
    published shards kept, and the re-run compute only the rest."""
    import fault_rows
    from m3po_core.store import RunStore

    work.mkdir(parents=True, exist_ok=True)
    judge = fault_rows.judge_server()
    p = fault_rows.Pipeline(str(work / "data"), str(work / "runs"), "killed-run", judge.base_url)
    p.write_dataset()
    sets = [a for o in p.cfg_overrides() + ["sampling.n=12"] for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), OPENAI_API_KEY="sk-faults-bench")
    cmd = [sys.executable, "-m", "m3po.flows.cli"]
    proc = subprocess.Popen(cmd + ["run", "--config", str(fault_rows.TINY), "--root", p.store_root, "--run-id",
                                   p.run_id, *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    store, started = RunStore(p.store_root, p.run_id), set()
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            started |= _descendants(proc.pid)
            if store.exists("candidates/_manifest") and any(e["state"] == "complete" for e in store.manifest("candidates")):
                break
            time.sleep(0.05)
        started |= _descendants(proc.pid)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        end = time.time() + 60
        while time.time() < end and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        left = sorted(pid for pid in started if _alive(pid))
        complete = {e["shard"]: e["finished_at"] for e in store.manifest("candidates") if e["state"] == "complete"}
        before = p.snapshot()
        out = subprocess.run(cmd + ["rerun-failed", p.run_id, "--root", p.store_root], env=env, capture_output=True,
                             text=True, timeout=900)
        after = {e["shard"]: e["finished_at"] for e in store.manifest("candidates") if e["state"] == "complete"}
        computed = store.read_json("report_info.json")["computed_shards"] if out.returncode == 0 else {}
    finally:
        judge.stop()
    row = fault_rows.outcome(p, before, {"candidates": computed.get("candidates")})
    expected = 3 - len(complete)
    row.update(fault="m3po run SIGKILLed while sampling", expected={"candidates": expected},
               message=f"{len(started)} process(es) started by the run, {len(left)} left 60 s after the kill",
               processes_left=left)
    ok = (running and out.returncode == 0 and not left and computed.get("candidates") == expected
          and all(after.get(s) == t for s, t in complete.items()) and row["rows_lost"] == 0)
    row["problems"] = [] if ok else [f"running {running}, rerun exit {out.returncode}, left {left}, computed "
                                     f"{computed}, kept {complete} -> {after}: {out.stdout[-300:]}{out.stderr[-500:]}"]
    return row


def bad_argument_row(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--run-id", "../x", "--root",
                          str(work / "runs")], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    started = (work / "prefect-home").exists() or (work / "runs").exists()
    ok = out.returncode == 2 and len(lines) == 1 and "--run-id '../x'" in lines[0] and not started
    return {"fault": "bad argument (--run-id ../x)", "recomputed": {}, "expected": {}, "rows_before": 0,
            "rows_lost": 0, "half_written": 0, "message": (lines or [""])[-1][:160],
            "problems": [] if ok else [f"exit {out.returncode}, {len(lines)} lines, started {started}"]}


def table(rows: list[dict]) -> str:
    out = ["| fault | computed again (expected) | shards kept | rows kept / lost | what was refused, or the outcome |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        computed = ", ".join(f"{s} {n}" + (f" ({r['expected'].get(s)})" if r["expected"].get(s) != n else "")
                             for s, n in r["recomputed"].items()) or "-"
        kept = f"{r['rows_before'] - r['rows_lost'] - r.get('rows_dropped', 0)} / {r['rows_lost']}"
        if r.get("rows_dropped"):
            kept += f" ({r['rows_dropped']} dropped, counted)"
        note = r.get("message") or ""
        if r["problems"]:
            note = "DIFFERS: " + "; ".join(r["problems"])
        shards = r.get("shards_kept", "-")
        out.append(f"| {r['fault']} | {computed} | {shards} | {kept} | {note.replace('|', '/')} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the killed-worker and killed-run rows")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="m3po-faults-"))
    os.environ.setdefault("OPENAI_API_KEY", "sk-faults-bench")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    rows = in_process_rows(work / "in-process")
    if not args.quick:
        rows.append(killed_worker_row(work / "worker"))
        print(f"# {rows[-1]['fault']}: {rows[-1]['problems'] or 'as expected'}", flush=True)
        rows.append(killed_run_row(work / "run"))
        print(f"# {rows[-1]['fault']}: {rows[-1]['problems'] or 'as expected'}", flush=True)
    rows.append(bad_argument_row(work / "args"))
    print(table(rows))
    lost = sum(r["rows_lost"] + r.get("rows_lost_during", 0) for r in rows)
    print(json.dumps({"rows": rows, "rows_lost": lost, "differ": [r["fault"] for r in rows if r["problems"]]},
                     default=str))
    print(f"{lost} rows lost")
    sys.exit(1 if lost or any(r["problems"] for r in rows) else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_lease"]:
        _lease_child(sys.argv[2])
    else:
        main()
