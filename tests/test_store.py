import pyarrow as pa
import pytest

from m3po_core import schema
from m3po_core.store import COMPLETE, FAILED, RunStore


def cands(n=3):
    return pa.table({"prompt_id": ["p"] * n, "cand_idx": list(range(n)), "text": ["x"] * n,
                     "token_ids": [[1, 2]] * n, "logp_sum": [-1.0] * n, "logp_mean": [-0.5] * n,
                     "n_tokens": [2] * n, "finish_reason": ["stop"] * n, "sampler": ["t"] * n, "seed": [0] * n,
                     "perturbation": [""] * n},
                    schema=schema.CANDIDATES)


def test_shard_publish_manifest_and_cache_key(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    entry = store.publish_shard("candidates", 0, cands(), schema.CANDIDATES, key="k1")
    assert entry["state"] == COMPLETE and entry["rows"] == 3 and len(entry["sha256"]) == 64
    assert store.shard_done("candidates", 0, "k1")
    assert not store.shard_done("candidates", 0, "k2")        # another configuration: recompute
    assert not store.shard_done("candidates", 1, "k1")
    assert store.read_stage("candidates").num_rows == 3
    # a corrupted file no longer matches the recorded hash
    (tmp_path / "r1" / "candidates" / "shard-00000.parquet").write_bytes(b"garbage")
    assert not store.shard_done("candidates", 0, "k1")


def test_shard_with_unrated_rows_is_published_but_not_done(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    store.publish_shard("scores", 0, cands(), schema.CANDIDATES, key="k1", unrated=2)
    assert store.read_stage("scores", n_shards=1).num_rows == 3    # readable by the next stage
    assert not store.shard_done("scores", 0, "k1")                 # but a re-run computes it again
    store.publish_shard("scores", 0, cands(), schema.CANDIDATES, key="k1", unrated=0)
    assert store.shard_done("scores", 0, "k1")


def test_same_table_same_bytes(tmp_path):
    a = RunStore(str(tmp_path), "a").write_table("t.parquet", cands(), schema.CANDIDATES)
    b = RunStore(str(tmp_path), "b").write_table("t.parquet", cands(), schema.CANDIDATES)
    assert a == b


def test_schema_is_enforced(tmp_path):
    store = RunStore(str(tmp_path), "r")
    bad = cands().drop_columns(["logp_sum"])
    with pytest.raises(KeyError):
        store.publish_shard("candidates", 0, bad, schema.CANDIDATES, key="k")
    assert store.shard_entry("candidates", 0) is None
    assert not list((tmp_path / "r").rglob("*.parquet"))      # nothing half-written


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path), "r")

    def broken_mv(*a, **k):
        raise PermissionError("disk says no")

    monkeypatch.setattr(store.fs, "mv", broken_mv)
    with pytest.raises(PermissionError):
        store.write_json("x.json", {"a": 1})
    assert list((tmp_path / "r").rglob("*")) == []


def test_manifest_records_failures(tmp_path):
    store = RunStore(str(tmp_path), "r")
    store.publish_shard("scores", 0, cands(), schema.CANDIDATES, key="k")
    store.mark_shard("scores", 1, FAILED, "k", error="InputError: bad image")
    states = [(e["shard"], e["state"]) for e in store.manifest("scores")]
    assert states == [(0, COMPLETE), (1, FAILED)]
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        store.read_stage("scores", n_shards=2)


def test_run_id_is_checked(tmp_path):
    for bad in ("a/b", "exp1.v2", ""):  # it names a folder, flow runs and Prefect artifact keys
        with pytest.raises(ValueError, match="run id"):
            RunStore(str(tmp_path), bad)


def test_no_shard_starts_after_an_interrupt(tmp_path):
    """Ctrl-C reaches only the main thread; shards on the task runner's threads see STOP instead, and
    one that has not started leaves no record (a re-run computes it)."""
    from m3po_core import schema
    from m3po_core.stages import runner
    from m3po_core.errors import Interrupted

    store = RunStore(str(tmp_path), "r")
    runner.STOP.set()
    try:
        with pytest.raises(Interrupted, match="candidates shard 0 not started"):
            runner.run_shard(store, "candidates", 0, "k", lambda: pytest.fail("computed after the interrupt"),
                             schema.CANDIDATES)
        assert store.shard_entry("candidates", 0) is None
    finally:
        runner.STOP.clear()
