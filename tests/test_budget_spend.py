"""The run's judge spend under a budget (`scoring.budget.run_spend`): read at every scoring shard's
start, so at thousands of shards it must cost a listing, not a read of every record. These tests
count the records it reads, on a local root and on `s3://` (a real S3-compatible server on loopback)."""
import pytest

from m3po_core.scoring.budget import run_spend
from m3po_core.store import RunStore, round_stage


def counting(store: RunStore) -> list[tuple[str, list[int]]]:
    """Wrap the store's record reads so the test sees which records each call read."""
    reads: list[tuple[str, list[int]]] = []
    real = store.shard_entries

    def shard_entries(stage, shards):
        reads.append((stage, sorted(shards)))
        return real(stage, shards)

    store.shard_entries = shard_entries
    return reads


def spent(store: RunStore, stage: str, shard: int, requests: int, state: str = "complete") -> None:
    store.mark_shard(stage, shard, state, "key", judge_usage={"requests": requests, "cost": 0.01 * requests})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_run_spend_reads_again_only_the_records_that_changed(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else (request.getfixturevalue("s3_server") and f"s3://m3po/spend-{tmp_path.name}")
    store = RunStore(root, "run")
    for shard in range(40):
        spent(store, "scores", shard, 2)
    spent(store, "scores", 40, 9, state="running")  # not finished: not counted
    reads = counting(store)

    first = run_spend(store)
    assert first["requests"] == 80 and first["shards"] == 40 and first["cost"] == pytest.approx(0.8)
    assert reads == [("scores", list(range(41)))]

    reads.clear()
    assert run_spend(store)["requests"] == 80
    assert reads == [("scores", [])]  # no record changed: none read

    reads.clear()
    spent(store, "scores", 7, 5)         # a retried shard's record, rewritten with its new usage
    spent(store, "scores", 40, 3)        # the running shard finished
    spent(store, round_stage("scores", 1), 41, 4)  # an adaptive round of a shard with no scores record yet
    spent(store, round_stage("scores", 1), 3, 100)  # a round of a scored shard: counted in its scores record
    after = run_spend(store)
    assert after["requests"] == 80 - 2 + 5 + 3 + 4 and after["shards"] == 41
    assert reads == [("scores", [7, 40]), (round_stage("scores", 1), [3, 41])]

    # what every record says, read whole: the same figure
    scored = {e["shard"] for e in store.manifest("scores") if e["state"] == "complete"}
    whole = sum(e["judge_usage"]["requests"] for e in store.manifest("scores") if e["state"] == "complete")
    whole += sum(e["judge_usage"]["requests"] for e in store.manifest(round_stage("scores", 1)) if e["shard"] not in scored)
    assert after["requests"] == whole


def test_a_file_system_whose_listing_has_no_version_is_read_every_time():
    """fsspec's memory:// lists no ETag, inode or modification time: nothing can be known unchanged,
    so every record is read again and a rewritten one is never served stale."""
    store = RunStore("memory://m3po-spend-test", "run")
    assert set(store.manifest_versions("scores").values()) <= {None}
    spent(store, "scores", 0, 2)
    reads = counting(store)
    assert store.manifest_versions("scores") == {0: None}
    assert run_spend(store)["requests"] == 2
    spent(store, "scores", 0, 7)
    assert run_spend(store)["requests"] == 7
    assert reads == [("scores", [0]), ("scores", [0])]
