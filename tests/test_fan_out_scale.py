"""The remote fan-outs at scale against a real Prefect server on loopback (the session's test
server), a real process worker running the noop shard deployment and a real task worker: every poll
reads all the shards' states in one API call whether there are 5 or 40 of them, a deployment
fan-out's submission is one bulk call per 100 runs, and failed and crashed shards are named."""
import math
import os
import re
import time
from pathlib import Path

import pytest
from prefect import flow, tags as prefect_tags, task

import noop_stage
from m3po.flows.machinery import remote_shards
from m3po.flows.machinery.fan_out import fan_out
from m3po_core.config import load_config
from m3po_core.errors import M3POError
from m3po_core.store import RunStore
from prefect_loopback import RequestCounter, deploy_noop, start_process_worker, start_task_worker, stop, worker_env

TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.slow  # flow-run processes: a few minutes on two cores


@pytest.fixture(scope="module")
def workers(tmp_path_factory, request):
    import signal

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    logs = tmp_path_factory.mktemp("logs")
    env = {**worker_env(url, Path(os.environ["PREFECT_HOME"])),  # the task-scheduling storage is shared
           "PYTHONFAULTHANDLER": "1"}
    deploy_noop(url)
    procs = [start_process_worker(env, logs / "process-worker.log", 4), start_task_worker(env, logs / "task-worker.log", 4)]
    yield logs
    if request.session.testsfailed and procs[1].poll() is None:
        procs[1].send_signal(signal.SIGABRT)  # the task worker's threads into its log, to see where it was
    for proc in procs:
        stop(proc)


@flow(name="noop-stage")
def noop_stage_flow(mode: str, n: int, ref: str, root: str, run_id: str, stage: str = noop_stage.STAGE,
                    extra: list[str] | None = None):
    cfg = load_config(TINY, noop_stage.register() + [f"execution.shards={mode}", "execution.poll_seconds=0.5",
                                                     "execution.shard_timeout_seconds=400", *(extra or [])])
    return fan_out(noop_stage.noop_task, cfg, RunStore(root, run_id), n, ref, stage, ref_name="model_ref")


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))


def _polling_phase(counter: RequestCounter, t0: float, read: str) -> tuple[dict, dict]:
    """The orchestrator's requests before its first state read (submission) and from it on (polling)."""
    first = min(t for t, r in counter.requests if t >= t0 and r == read)
    return counter.by_route(t0, first), counter.by_route(first)


def test_task_worker_shards_are_read_back_in_one_call_per_poll(workers, tmp_path):
    counter = RequestCounter()
    per_poll = {}
    for n in (5, 40):
        t0 = time.time()
        with counter.counting(), prefect_tags(f"run:tw{n}", "config:tiny"):   # as the CLI runs a pipeline
            results = noop_stage_flow("task_worker", n, "ok", str(tmp_path), f"tw{n}")
        assert [r.shard for r in results] == list(range(n)) and all(r.rows == 1 and not r.cached for r in results)
        poll = remote_shards.last_poll
        submission, polling = _polling_phase(counter, t0, "POST /task_runs/filter")
        assert submission["POST /task_runs/"] == n                       # one Task.delay per shard
        assert polling["POST /task_runs/filter"] == poll.polls + poll.lease_calls  # one read per poll, no paging
        assert poll.calls == poll.polls + poll.count_calls + poll.lease_calls  # + a count every 120 s, leases
        # everything else the polling does: the progress artifact (once per poll at most), logs, the flow's end
        other = sum(c for r, c in polling.items() if r not in ("POST /task_runs/filter", "POST /logs/"))
        assert polling["PATCH /artifacts/{id}"] <= poll.polls and other <= poll.polls + 5, polling
        per_poll[n] = (polling["POST /task_runs/filter"] + polling["PATCH /artifacts/{id}"]) / poll.polls
    assert per_poll[5] <= 2 and per_poll[40] <= 2, per_poll

    # a page that comes back full is followed by one for the runs it did not hold
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    with get_client(sync_client=True) as client:
        # no tags on the background runs, not even the flow's (flows/machinery/task_worker.py: they deadlock workers)
        shard_runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(poll.runs.values()))))
        assert len(shard_runs) == 40 and all(r.tags == [] for r in shard_runs)
        again = remote_shards.ShardPoll(client, "task", poll.runs, page=7)
        assert sorted(again.finished()) == list(range(40)) and again.calls == math.ceil(40 / 7)
        assert not again.outstanding
        # a page larger than the server returns (its PREFECT_API_DEFAULT_LIMIT: 200) is refused; the poll takes its limit
        big = remote_shards.ShardPoll(client, "task", poll.runs, page=500)
        assert sorted(big.finished()) == list(range(40)) and big.page == 200 and big.calls == 2


@task(name="nobody-serves-this")
def unserved(x: int) -> int:
    return x


def test_shards_no_worker_takes_are_counted_in_one_call_and_time_out_by_name(workers, tmp_path):
    from prefect.client.orchestration import get_client

    runs = {i: unserved.delay(i).task_run_id for i in range(3)}
    with get_client(sync_client=True) as client:
        poll = remote_shards.ShardPoll(client, "task", runs)
        assert poll.waiting() == 3 and poll.calls == 1
    # the real sampling shards, and no `m3po worker`: scheduled for ever, so the stage times out naming them
    with pytest.raises(M3POError, match=r"candidates: 2 of 2 shards failed \(shard 0: no result after 2s \(run \S+ "
                                        r"SCHEDULED\).*; shard 1: no result"):
        noop_stage_flow("task_worker", 2, "ok", str(tmp_path), "nw1", stage="candidates",
                        extra=["execution.shard_timeout_seconds=2"])


def test_deployment_shards_fail_and_crash_by_name_and_are_read_in_one_call_per_poll(workers, tmp_path):
    counter = RequestCounter()
    from m3po.flows.machinery import deployment_submission

    for n in (5, 40):
        t0, resent = time.time(), deployment_submission.resent_batches
        with counter.counting(), pytest.raises(M3POError) as failed:
            noop_stage_flow("deployment", n, "fail:2;crash:3", str(tmp_path), f"dep{n}")
        message = str(failed.value)
        assert f"noop: 2 of {n} shards failed" in message, _logs(workers)
        assert "shard 2: ValueError: noop shard 2 told to fail" in message               # from the manifest
        assert re.search(r"shard 3: run \S+ ended CRASHED: .*exit", message), message   # from the run: no record
        poll = remote_shards.last_poll
        submission, polling = _polling_phase(counter, t0, "POST /flow_runs/filter")
        # the deployment read once, a placeholder task run per shard (the subflow link), the runs 100 per call
        assert submission["GET /deployments/name/m3po-noop-shard/noop"] == 1
        assert submission["POST /task_runs/"] == n
        # 100 per call, plus each batch sent again because the SQLite server refused part of it
        assert submission["POST /deployments/{id}/create_flow_run/bulk"] == \
            math.ceil(n / 100) + deployment_submission.resent_batches - resent
        assert polling["POST /flow_runs/filter"] == poll.polls + poll.lease_calls
        assert poll.calls == poll.polls + poll.count_calls + poll.lease_calls
        assert polling["PATCH /artifacts/{id}"] <= poll.polls
        other = sum(c for r, c in polling.items() if r not in ("POST /flow_runs/filter", "POST /logs/"))
        assert other <= poll.polls + 5, polling  # the artifact (once per poll at most), counts, the flow's end
        store = RunStore(str(tmp_path), f"dep{n}")
        states = {e["shard"]: e["state"] for e in store.manifest(noop_stage.STAGE)}
        assert states[2] == "failed" and states[3] == "running" and list(states.values()).count("complete") == n - 2


def test_deployment_runs_of_several_shards_report_each_shard_by_name(workers, tmp_path):
    """execution.shards_per_run=4: 10 shards in 3 flow runs. A failed shard leaves its run's other
    shards done; a run whose process is killed at shard 6 keeps the shards it finished (4, 5), and
    the one it never reached (7) is named as such; a re-run computes only those three."""
    from m3po.flows.machinery import deployment_submission

    counter = RequestCounter()
    t0 = time.time()
    resent_before = deployment_submission.resent_batches
    with counter.counting(), pytest.raises(M3POError) as failed:
        noop_stage_flow("deployment", 10, "fail-once:2;crash-once:6", str(tmp_path), "grp",
                        extra=["execution.shards_per_run=4"])
    message = str(failed.value)
    assert "noop: 3 of 10 shards failed" in message, _logs(workers)
    assert "shard 2: ValueError: noop shard 2 told to fail once" in message
    assert re.search(r"shard 6: run \S+ ended CRASHED", message) and "shard 6: run" in message
    assert re.search(r"shard 7: run \S+ ended CRASHED before it reached this shard", message), message
    submission, _ = _polling_phase(counter, t0, "POST /flow_runs/filter")
    # one bulk call, plus one per batch a busy SQLite refused in part and had sent again
    resent = deployment_submission.resent_batches - resent_before
    assert submission["POST /task_runs/"] == 3 and submission["POST /deployments/{id}/create_flow_run/bulk"] == 1 + resent
    store = RunStore(str(tmp_path), "grp")
    states = {e["shard"]: e["state"] for e in store.manifest(noop_stage.STAGE)}
    assert {s for s, st in states.items() if st == "complete"} == {0, 1, 3, 4, 5, 8, 9}
    assert 7 not in states  # never reached: no record
    done = {e["shard"]: e["finished_at"] for e in store.manifest(noop_stage.STAGE) if e["state"] == "complete"}

    results = noop_stage_flow("deployment", 10, "fail-once:2;crash-once:6", str(tmp_path), "grp",
                              extra=["execution.shards_per_run=4"])
    assert sorted(r.shard for r in results if not r.cached) == [2, 6, 7]
    after = {e["shard"]: e["finished_at"] for e in store.manifest(noop_stage.STAGE)}
    assert all(after[s] == t for s, t in done.items())


def test_a_batch_sent_again_returns_the_runs_it_created_not_new_ones(workers, tmp_path):
    """Each shard's flow run carries an idempotency key: a batch the server refused in part (SQLite's
    "database is locked" comes back as a per-run failure) is sent again without doubling any run."""
    from prefect.client.orchestration import get_client

    from prefect_loopback import DEPLOYMENT

    config = load_config(TINY, []).to_dict()
    params = [{"config": config, "root": str(tmp_path), "run_id": "idem", "shard": i, "model_ref": "ok"} for i in range(3)]
    tags = [["run:idem", "fan-out:test-idem", f"shard:{i}"] for i in range(3)]
    with get_client(sync_client=True) as client:
        first = remote_shards.create_flow_runs(client, DEPLOYMENT, params, tags, "fan-out:test-idem")
        again = remote_shards.create_flow_runs(client, DEPLOYMENT, params, tags, "fan-out:test-idem")
    assert first == again and sorted(first) == [0, 1, 2] and len(set(first.values())) == 3
