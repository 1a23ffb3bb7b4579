"""`m3po status` on a run of thousands of shards per stage, locally and on s3:// (moto's server on
loopback): the manifest records (written directly, as shards would) are counted right, the failed
shards are named grouped by their error, and the output stays a few lines."""
import json

import pytest

from m3po_core.status import ranges, stage_lines
from m3po_core.store import RunStore

SHARDS = {"local": 2500, "s3": 1000}  # per stage; s3: moto serves one request at a time, ~10-25 ms each


def _records(stage: str, n: int) -> dict[str, dict]:
    """n shard records: every 200th failed (the first three with one error, the rest each its own),
    shard 11 running, 12 complete with unrated candidates, the last 3 without a record."""
    out = {}
    for i in range(n - 3):
        if i % 200 == 7:
            rec = {"state": "failed", "error": "OSError: bucket throttled" if i < 500 else f"ValueError: image {i} unreadable"}
        elif i == 11:
            rec = {"state": "running"}
        elif i == 12:
            rec = {"state": "complete", "rows": 8, "unrated": 2, "attempts": 1}
        else:
            rec = {"state": "complete", "rows": 8}
        out[f"{stage}/_manifest/shard-{i:05d}.json"] = {"stage": stage, "shard": i, "key": "k", **rec}
    return out


def _write(store: RunStore, n: int) -> None:
    files = {store.path("prompts/_stage.json"): json.dumps({"n_shards": n}).encode()}
    for stage in ("candidates", "scores"):
        files.update({store.path(rel): json.dumps(rec).encode() for rel, rec in _records(stage, n).items()})
    if store.is_local:
        for path, data in files.items():
            store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            store.fs.pipe_file(path, data)
    else:
        store.fs.pipe(files)  # concurrent puts


def _check(out: str, n: int) -> None:
    lines = out.splitlines()
    assert len(lines) < 40, out
    failed = [i for i in range(n - 3) if i % 200 == 7]
    for stage in ("candidates", "scores"):
        head = next(line for line in lines if line.startswith(stage))
        assert head.split() == [stage, str(n), "shards", f"complete={n - 3 - len(failed) - 1}", f"failed={len(failed)}",
                                "running=1", "missing=3"], head
    assert "  shards 7, 207, 407 (3): OSError: bucket throttled" in lines
    assert all(f"  shard {i}: ValueError: image {i} unreadable" in lines for i in failed[3:])
    assert "  shard 12: complete, 2 unrated: re-run to retry" in lines
    assert "  running: 11" in lines and f"  missing: {n - 3}-{n - 1}" in lines


@pytest.mark.parametrize("where", ["local", "s3"])
def test_status_of_thousands_of_shards_counts_them_and_stays_short(where, tmp_path, capsys, request):
    from m3po.flows.cli import _parser, _status

    root = str(tmp_path / "runs") if where == "local" else (request.getfixturevalue("s3_server"), "s3://m3po/status")[1]
    n = SHARDS[where]
    store = RunStore(root, "big")
    _write(store, n)
    assert set(store.shard_entries("scores", [0, 7, n - 1])) == {0, 7}     # a shard without a record: left out
    args = _parser().parse_args(["status", "big", "--root", root])
    assert _status(args.root, args.run_id, args.show_all) == 0
    _check(capsys.readouterr().out, n)


def test_many_distinct_errors_are_capped_unless_all_is_asked():
    entries = {i: {"shard": i, "state": "failed", "error": f"error {i}"} for i in range(100)}
    short, full = stage_lines("scores", 100, entries), stage_lines("scores", 100, entries, show_all=True)
    assert len(short) == 22 and short[-1].startswith("  ... 80 more groups (80 shards)")
    assert len(full) == 101 and "  shard 99: error 99" in full
    assert ranges([5, 1, 2, 3, 9, 10]) == ["1-3", "5", "9-10"] and ranges([]) == []


def test_manifest_records_are_read_concurrently_on_s3(s3_server, monkeypatch):
    """Each GET held 50 ms (an object store's round trip): the records are fetched several at once,
    not one round trip after another."""
    import s3fs
    from flaky_s3 import FlakyS3Proxy

    proxy = FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        store = RunStore("s3://m3po/concurrent", "r1")
        store.fs.pipe({store.path(f"scores/_manifest/shard-{i:05d}.json"): json.dumps({"shard": i, "state": "complete"}).encode()
                       for i in range(60)})
        proxy.delay, proxy.max_in_flight = 0.05, 0
        assert [e["shard"] for e in store.manifest("scores")] == list(range(60))
        assert proxy.max_in_flight >= 4, proxy.max_in_flight
        assert sorted(store.shard_entries("scores", [3, 59, 60])) == [3, 59]
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()

