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
    yield {"url": url, "logs": logs, "env": env}
    for proc in (worker, server):
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
