"""The DAG as its users run it: a Prefect server and a process worker on loopback, the deployments of
deployments/prefect.yaml, an s3:// root on a loopback S3 server, every shard its own flow run."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from m3po_core.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory, s3_server):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, **s3_server, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "M3PO_HOME": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "m3po"}
    logs = tmp_path_factory.mktemp("logs")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("prefect server did not start: " + (logs / "server.log").read_text()[-2000:])
    run = lambda *args: subprocess.run([prefect, *args], env=env, cwd=REPO, check=True, capture_output=True,
                                       text=True, timeout=300)
    run("work-pool", "create", "m3po-gpu", "--type", "process")
    run("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "m3po-gpu", "--limit", "4"], env=env, cwd=REPO,
                              stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
    # a long-lived shard worker for `execution.shards: task_worker` (what a GPU machine runs)
    task_worker = subprocess.Popen([str(Path(sys.executable).parent / "m3po"), "worker", "--limit", "2"], env=env,
                                   cwd=REPO, stdout=open(logs / "task_worker.log", "w"), stderr=subprocess.STDOUT)
    yield {"url": url, "logs": logs, "env": env, "prefect": prefect}
    for proc in (task_worker, worker, server):
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still shutting down (a worker may wait on its flow runs)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def test_demo_deployment_fans_shards_out_as_flow_runs_on_s3(prefect_stack, s3_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = load_config(TINY, ["execution.shards=deployment", "execution.poll_seconds=1"])
    params = {"config": cfg.to_dict(), "root": "s3://m3po/integration", "run_id": "int1"}
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack["url"]}):
        parent = run_deployment("m3po-pipeline/m3po-pipeline", parameters=params, timeout=900, poll_interval=2,
                                as_subflow=False)
        logs = prefect_stack["logs"]
        assert parent.state.is_completed(), (parent.state, (logs / "worker.log").read_text()[-4000:])
        with get_client(sync_client=True) as client:
            # the UI can tell runs apart by run id and configuration, even when a schedule started them
            assert {"m3po", "run:int1", "config:tiny", "strategy:m3po"} <= set(client.read_flow_run(parent.id).tags)
            runs_of = {}
            for name in ("m3po-sample-shard/m3po-sample-shard", "m3po-score-shard/m3po-score-shard"):
                dep = client.read_deployment_by_name(name)
                runs_of[name] = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            for name, runs in runs_of.items():
                assert len(runs) == 3, name                       # tests/tiny.yaml: 24 prompts, shards of 8
                assert all(r.state.is_completed() for r in runs), name
                assert sorted(r.parameters["shard"] for r in runs) == [0, 1, 2]
            nightly = client.read_deployment_by_name("m3po-pipeline/m3po-pipeline")
            crons = [s.schedule.cron for s in nightly.schedules]
            assert crons == ["0 3 * * *"] and not any(s.active for s in nightly.schedules)
            # credentials never reach flow parameters or logs
            secret = s3_server["AWS_SECRET_ACCESS_KEY"]
            all_runs = client.read_flow_runs()
            assert all(secret not in repr(r.parameters) for r in all_runs)
            assert all(secret not in log.message for log in client.read_logs())
    import s3fs

    fs = s3fs.S3FileSystem()
    assert fs.exists("m3po/integration/int1/report.md")
    assert len(fs.glob("m3po/integration/int1/scores/shard-*.parquet")) == 3


def _worker_logs(prefect_stack) -> str:
    logs = prefect_stack["logs"]
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


def test_task_workers_run_every_shard_and_load_each_model_once(prefect_stack):
    """`execution.shards: task_worker`: each shard a background task run taken by `m3po worker`,
    which loads the policy and the CLIP encoder once for all the shards it runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = load_config(TINY, ["execution.shards=task_worker", "execution.poll_seconds=1"])
    params = {"config": cfg.to_dict(), "root": "s3://m3po/integration", "run_id": "tw1"}
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack["url"]}):
        parent = run_deployment("m3po-pipeline/m3po-pipeline", parameters=params, timeout=900, poll_interval=2,
                                as_subflow=False)
        assert parent.state.is_completed(), (parent.state, _worker_logs(prefect_stack))
        with get_client(sync_client=True) as client:
            for prefix, model in (("sample-tw1-", "vlm"), ("score-tw1-", "clip")):
                runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)))
                assert sorted(r.name for r in runs) == [f"{prefix}{i}" for i in range(3)]
                assert all(r.state.is_completed() for r in runs)
                logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in runs])))
                loads = [log.message for log in logs if log.message.startswith(f"loaded {model} ")]
                assert len(loads) == 1, (loads, _worker_logs(prefect_stack))


def test_retrying_the_failed_parent_run_recomputes_only_the_broken_shard(prefect_stack):
    """A shard breaks (undecodable image on S3): the parent flow run fails naming it; after the repair,
    `prefect flow-run retry` runs the same flow run again: only that shard is sampled, the DAG completes."""
    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from m3po_core.stages import prompts
    from m3po_core.store import RunStore

    cfg = load_config(TINY, ["execution.shards=deployment", "execution.poll_seconds=1"])
    root = "s3://m3po/integration"
    store = RunStore(root, "retry1")
    prompts.prepare_prompts(cfg, store)  # the run finds its prompts cached and samples from them
    victim = prompts.read_prompts_shard(store, 1)[0]["image"]
    fs = s3fs.S3FileSystem()
    good = fs.cat_file(victim)
    fs.pipe_file(victim, b"not a png")
    params = {"config": cfg.to_dict(), "root": root, "run_id": "retry1"}
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack["url"]}):
        parent = run_deployment("m3po-pipeline/m3po-pipeline", parameters=params, timeout=900, poll_interval=2,
                                as_subflow=False)
        assert parent.state.is_failed(), parent.state
        assert "shard 1" in parent.state.message, parent.state.message
        entries = {e["shard"]: e for e in store.manifest("candidates")}
        assert entries[1]["state"] == "failed" and victim in entries[1]["error"]
        kept = {i: entries[i]["finished_at"] for i in (0, 2)}

        fs.pipe_file(victim, good)
        subprocess.run([prefect_stack["prefect"], "flow-run", "retry", str(parent.id)], env=prefect_stack["env"],
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=120)
        with get_client(sync_client=True) as client:
            deadline = time.time() + 900
            while time.time() < deadline:
                state = client.read_flow_run(parent.id).state
                if state.is_final():  # the retry has rescheduled it
                    break
                time.sleep(2)
            assert state.is_completed(), (state, _worker_logs(prefect_stack))
    entries = {e["shard"]: e for e in store.manifest("candidates")}
    assert all(e["state"] == "complete" for e in entries.values()) and len(entries) == 3
    assert {i: entries[i]["finished_at"] for i in (0, 2)} == kept       # read from the cache
    assert entries[1]["finished_at"] > max(kept.values())               # recomputed
    assert store.read_json("report_info.json")["computed_shards"]["candidates"] == 1
