"""The store is the shards' truth: task-worker shard runs that the server never sees end (here no
task worker takes them, and the shards are computed beside the fan-out, as when Prefect's task-run
recorder loses a run's final events) are taken as done from their complete manifest records, once
no run has ended for half a lease; the runs stay unfinished on the server."""
import contextvars
import threading
import time
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

import noop_stage
from m3po.flows.machinery import remote_shards
from m3po.flows.machinery.fan_out import fan_out
from m3po_core.config import load_config
from m3po_core.store import RunStore

TINY = Path(__file__).parent / "tiny.yaml"
SETTINGS = ["execution.shards=task_worker", "execution.poll_seconds=0.3", "execution.lease_seconds=2",
            "execution.shard_timeout_seconds=120"]


@flow(name="noop-stage-store-truth")
def stage(root: str, n: int):
    cfg = load_config(TINY, noop_stage.register() + SETTINGS)
    return fan_out(noop_stage.noop_task, cfg, RunStore(root, "truth"), n, "ok", noop_stage.STAGE, ref_name="model_ref")


def test_shards_complete_in_the_store_end_a_fan_out_whose_runs_never_end(tmp_path):
    remote_shards.last_poll = None
    got = {}
    context = contextvars.copy_context()  # the session's API settings, in the fan-out's thread too
    fan = threading.Thread(target=lambda: context.run(lambda: got.update(results=stage(str(tmp_path), 3))))
    fan.start()
    deadline = time.time() + 120
    while (remote_shards.last_poll is None or len(remote_shards.last_poll.runs) < 3) and time.time() < deadline \
            and fan.is_alive():
        time.sleep(0.1)
    poll = remote_shards.last_poll
    assert poll is not None and len(poll.runs) == 3, "the fan-out never submitted its runs"
    cfg = load_config(TINY, noop_stage.register() + SETTINGS)
    for shard in range(3):  # what the runs would have done
        noop_stage.noop_shard(cfg, RunStore(str(tmp_path), "truth"), shard, "ok")
    fan.join(120)
    assert not fan.is_alive(), "the fan-out did not end"
    results = got["results"]
    assert [r.shard for r in results] == [0, 1, 2] and all(r.rows == 1 and not r.cached for r in results)
    with get_client(sync_client=True) as client:
        states = {client.read_task_run(run_id).state_type for run_id in poll.runs.values()}
    assert states <= {StateType.SCHEDULED, StateType.PENDING}  # the server never saw them end


def test_the_store_check_reads_again_only_the_records_that_changed(tmp_path):
    """At thousands of outstanding shards the check runs every half lease while nothing ends: one
    listing, and a read of only the records written since the last check."""
    import uuid

    store = RunStore(str(tmp_path), "truth")
    runs = {s: uuid.uuid4() for s in range(0, 40, 2)}
    poll = remote_shards.ShardPoll(None, "task", runs, jobs={s: [s, s + 1] for s in runs})
    reads: list[list[int]] = []
    real = store.shard_entries
    store.shard_entries = lambda stage, shards: reads.append(sorted(shards)) or real(stage, shards)
    started = time.time()
    for shard in range(10):
        store.mark_shard("noop", shard, "running", "k")
    assert remote_shards.complete_in_store(store, "noop", poll, started, 1.0) == {}
    assert reads == [list(range(10))]  # the shards with a record; the other 30 have none to read
    assert remote_shards.complete_in_store(store, "noop", poll, started, 1.0) == {}
    assert reads[-1] == []  # nothing changed: nothing read
    store.publish_shard("noop", 4, noop_table(), noop_schema(), "k")
    store.publish_shard("noop", 5, noop_table(), noop_schema(), "k")
    store.publish_shard("noop", 7, noop_table(), noop_schema(), "k")  # its run's shard 6 still running
    done = remote_shards.complete_in_store(store, "noop", poll, started, 1.0)
    assert reads[-1] == [4, 5, 7] and list(done) == [4] and sorted(done[4]) == [4, 5]


def noop_table():
    import pyarrow as pa

    return pa.table({"x": [1]}, schema=noop_schema())


def noop_schema():
    import pyarrow as pa

    return pa.schema([("x", pa.int64())])
