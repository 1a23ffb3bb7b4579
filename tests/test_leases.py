"""Dead workers are noticed without a fixed timeout: a running shard renews a lease in the store,
and the task-worker fan-out submits again the shards whose lease lapsed. Against the session's
Prefect server, with two real task workers, one of which is killed with SIGKILL mid-shard."""
import os
import time
from pathlib import Path

import pytest
from prefect import flow

import noop_stage
from m3po.flows.machinery.fan_out import fan_out
from m3po_core.config import load_config
from m3po_core.stages.runner import shard_lease
from m3po_core.store import RunStore
from prefect_loopback import start_task_worker, stop, worker_env

TINY = Path(__file__).parent / "tiny.yaml"


def test_a_lease_is_renewed_while_its_block_runs_and_only_once_per_shard(tmp_path):
    store = RunStore(str(tmp_path), "lease")
    with shard_lease(store, "toy", 3, 0.4):
        first = store.leases("toy", [3])[3]
        with shard_lease(store, "toy", 3, 0.4):  # nested (the job, then run_shard): one renewer
            time.sleep(0.5)
        second = store.leases("toy", [3])[3]
    assert second["renewed_at"] > first["renewed_at"] and second["pid"] == os.getpid()
    time.sleep(0.3)
    assert store.leases("toy", [3])[3] == store.leases("toy", [3])[3]  # no renewal after the block
    assert os.listdir(tmp_path / "lease" / "toy" / "_leases") == ["shard-00003.json"]


@pytest.fixture
def two_task_workers(tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = worker_env(PREFECT_API_URL.value(), Path(os.environ["PREFECT_HOME"]))
    procs = [start_task_worker(env, tmp_path / f"task-worker-{i}.log", 2) for i in range(2)]
    yield procs
    for proc in procs:
        stop(proc)


@flow(name="noop-stage-leases")
def lease_flow(n: int, ref: str, root: str, run_id: str, lease: float):
    cfg = load_config(TINY, noop_stage.register() + ["execution.shards=task_worker", "execution.poll_seconds=0.5",
                                                     f"execution.lease_seconds={lease}",
                                                     "execution.shard_timeout_seconds=400"])
    return fan_out(noop_stage.noop_task, cfg, RunStore(root, run_id), n, ref, noop_stage.STAGE, ref_name="model_ref")


@pytest.mark.slow
def test_a_task_worker_killed_mid_shard_costs_its_shards_not_the_stage(tmp_path, two_task_workers):
    store = RunStore(str(tmp_path), "killed")
    t0 = time.time()
    state = lease_flow(n=6, ref="crash-once:2", root=str(tmp_path), run_id="killed", lease=4.0, return_state=True)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("task-worker-*.log"))
    assert state.is_completed(), f"{state}\n{logs}"
    assert store.exists(f"{noop_stage.STAGE}/crashed-2")                   # the first attempt was killed
    assert sorted(p.returncode for p in two_task_workers if p.poll() is not None) == [-9], logs
    entries = {e["shard"]: e for e in store.manifest(noop_stage.STAGE)}
    assert sorted(entries) == list(range(6)) and all(e["state"] == "complete" for e in entries.values())
    assert all(e["finished_at"] > t0 for e in entries.values())


def test_a_run_left_scheduled_while_the_stage_idles_counts_as_stalled(tmp_path):
    """A task worker takes a run off the server's queue before it has a slot for it; killed then,
    it leaves the run Scheduled with no lease, and no other worker is given it. The fan-out calls
    such a run stalled once no shard has run for a lease (never before any shard ended: the workers
    may not be up yet), and only while no shard is running. Against the session's API: the run is
    real and no worker serves it."""
    from prefect.client.orchestration import get_client

    from m3po.flows.machinery.remote_shards import ShardPoll, lapsed_shards, submit

    cfg = load_config(TINY, noop_stage.register() + ["execution.shards=task_worker"])
    store = RunStore(str(tmp_path), "stalled")
    params = [{"config": cfg.to_dict(), "root": store.root, "run_id": store.run_id, "shard": 0, "model_ref": "ok"}]
    with get_client(sync_client=True) as client:
        runs = submit(client, cfg, noop_stage.STAGE, params, [[]], "fan-out:stalled-test")  # no tags, as the fan-out
        try:
            poll = ShardPoll(client, "task", runs)
            assert lapsed_shards(poll, store, noop_stage.STAGE, 4.0, None) == ({}, {})   # nothing ended yet
            assert lapsed_shards(poll, store, noop_stage.STAGE, 4.0, 3.0) == ({}, {})    # idle for less than a lease
            lapsed, stalled = lapsed_shards(poll, store, noop_stage.STAGE, 4.0, 10.0)
            assert lapsed == {} and list(stalled) == [0]
            assert "still scheduled after 10s in which no shard of the stage ran" in stalled[0]
        finally:  # a task worker of a later test would be handed this run
            client.delete_task_run(runs[0])
