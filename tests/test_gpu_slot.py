"""A shard's GPU slot against the session's real Prefect API: held (and released) where the global
concurrency limit exists, skipped without a write where it does not, and a limit created later
applies once the process's lookup is older than LOOKUP_SECONDS."""
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from m3po.tasks import gpu_slot as gs


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
