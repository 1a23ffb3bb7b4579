"""The fault matrix, row by row (`tests/fault_rows.py`; `bench/faults.py` prints it): every fault
keeps what was finished, computes again exactly the shards it touched, and refuses what it must
with a message that names the input. The rows that need workers and servers have their own tests:
a killed task worker (tests/test_leases.py), a killed run (tests/test_pipeline.py and
tests/test_no_orphans.py), bad arguments (tests/test_cli_args.py)."""
import pytest

import fault_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge(monkeypatch_module):
    server = fault_rows.judge_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-faults-SECRET")
        yield mp


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fault-store"))  # the tiny models are built once, here


@pytest.fixture
def proxy(s3_server, monkeypatch):
    import s3fs
    from flaky_s3 import FlakyS3Proxy

    proxy = FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


MESSAGES = {
    "image reference outside its root": r"data\.json: record 2 \(id 'r2'\).*'\.\./secret\.png'",
    "published shard corrupted": r"shard-00001\.parquet: its bytes do not match the SHA-256",
    "judge retry fails (401)": r"401",
    "object store outage mid-stage": r"\] \S+: .*\(after 4 tries\)",   # names the object it could not reach
}


@pytest.mark.parametrize("name", list(fault_rows.ROWS))
def test_each_fault_keeps_what_was_done_and_recomputes_exactly_its_shards(name, judge, store_root, tmp_path, request):
    fn, needs_s3, _ = fault_rows.ROWS[name]
    row = fn(tmp_path, request.getfixturevalue("proxy") if needs_s3 else store_root, judge)
    assert fault_rows.check(name, row) == [], row
    if name in MESSAGES:
        import re
        assert re.search(MESSAGES[name], row["message"]), row["message"]
    if name == "judge retry fails (401)":
        assert "401" in row["last_retry"]
    if name == "a write fails mid-file (full disk)":
        assert row["child_exit"] != 0 and "File too large" in row["message"], row["message"]
