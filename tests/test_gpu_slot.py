"""A shard's GPU slot against the session's real Prefect API: held (and released) where the global
concurrency limit exists, skipped without a write where it does not, and a limit created later
applies once the process's lookup is older than LOOKUP_SECONDS."""
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from m3po.flows.machinery import gpu_slot as gs


def _active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def _create(name: str, limit: int = 2) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def test_an_existing_limit_is_held_while_the_shard_runs_and_released_after():
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    _create(name)
    with gs.gpu_slot(name) as held:
        assert held and _active_slots(name) == 1
    assert _active_slots(name) == 0


def test_an_absent_limit_is_skipped_and_one_created_later_applies_after_the_lookup_expires(monkeypatch):
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    with gs.gpu_slot(name) as held:
        assert held is False
    _create(name)
    with gs.gpu_slot(name) as held:  # the process's answer is still "absent"
        assert held is False and _active_slots(name) == 0
    monkeypatch.setattr(gs, "LOOKUP_SECONDS", 0.0)
    with gs.gpu_slot(name) as held:
        assert held and _active_slots(name) == 1
    assert _active_slots(name) == 0


@pytest.mark.parametrize("name", [None, ""])
def test_no_limit_named_means_no_slot(name):
    with gs.gpu_slot(name) as held:
        assert held is False


def test_a_deployment_shard_waits_for_its_slot_and_a_task_worker_shard_takes_none(tmp_path, monkeypatch):
    """The pool's one slot held elsewhere: a task-worker shard (its worker's --limit is its GPUs)
    completes at once; a deployment shard run waits until the slot is released, then completes."""
    import threading
    from pathlib import Path

    import noop_stage
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    monkeypatch.setattr(gs, "LOOKUP_SECONDS", 0.0)
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    _create(name, limit=1)
    config = load_config(Path(__file__).parent / "tiny.yaml", [f"execution.gpu_concurrency_limit={name}"]).to_dict()
    store = RunStore(str(tmp_path), "slots")
    done = lambda shard: (store.shard_entry(noop_stage.STAGE, shard) or {}).get("state") == "complete"
    release = threading.Event()

    def occupy():
        with gs.gpu_slot(name):
            release.wait(60)

    holder = threading.Thread(target=occupy)
    holder.start()
    try:
        while _active_slots(name) != 1:
            release.wait(0.05)
        noop_stage.noop_shard_job.fn(config, str(tmp_path), "slots", 0, "ok")
        assert done(0) and _active_slots(name) == 1
        flow_run = threading.Thread(target=noop_stage.noop_shard_flow, args=(config, str(tmp_path), "slots", 1, "ok"))
        flow_run.start()
        flow_run.join(3.0)
        assert flow_run.is_alive() and not done(1)  # waiting for the slot
    finally:
        release.set()
        holder.join()
    flow_run.join(120)
    assert not flow_run.is_alive() and done(1) and _active_slots(name) == 0


def test_a_run_of_several_shards_holds_one_slot_from_its_first_shard_to_its_last(tmp_path, monkeypatch):
    """`execution.shards_per_run`: the run's shards compute one after the other on its GPU, so the
    slot is acquired once and released once per run, not per shard; each shard computes holding it."""
    from pathlib import Path

    from prefect_loopback import RequestCounter

    from m3po.tasks.shard_jobs import run_shard_group
    from m3po_core.config import load_config
    from m3po_core.stages.runner import ShardResult

    monkeypatch.setattr(gs, "LOOKUP_SECONDS", 0.0)
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    _create(name, limit=1)
    config = load_config(Path(__file__).parent / "tiny.yaml", [f"execution.gpu_concurrency_limit={name}"]).to_dict()
    seen = []

    def stage_fn(cfg, store, shard, ref):
        seen.append((shard, _active_slots(name)))
        if shard == 1:
            raise ValueError("shard 1 fails; the run goes on")
        return ShardResult(stage="noop", shard=shard, rows=0, cached=False, seconds=0.0)

    with RequestCounter().counting() as counter:
        with pytest.raises(Exception, match="1 of 3 shards"):
            run_shard_group(stage_fn, "noop", config, str(tmp_path), "slots", [0, 1, 2], "ref")
    assert seen == [(0, 1), (1, 1), (2, 1)]
    routes = counter.by_route()
    assert routes["POST /v2/concurrency_limits/increment-with-lease"] == 1
    assert routes["POST /v2/concurrency_limits/decrement-with-lease"] == 1
    assert _active_slots(name) == 0
