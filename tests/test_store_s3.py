"""The run store on `s3://` through s3fs, against a real S3-compatible server on loopback (moto's
server mode, as s3fs's own test suite uses)."""
import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from m3po_core import schema
from m3po_core.data.images import load_image
from m3po_core.store import COMPLETE, RunStore


@pytest.fixture(scope="module")
def s3_root(s3_server):
    return "s3://m3po/runs"


def table(n=4):
    return pa.table({"prompt_id": [f"p{i}" for i in range(n)], "cand_idx": [0] * n, "text": ["t"] * n,
                     "token_ids": [[1]] * n, "logp_sum": [-1.0] * n, "logp_mean": [-1.0] * n, "n_tokens": [1] * n,
                     "finish_reason": ["stop"] * n, "sampler": ["x"] * n, "seed": [0] * n, "perturbation": [""] * n},
                    schema=schema.CANDIDATES)


def test_shards_and_manifest_on_s3(s3_root):
    store = RunStore(s3_root, "r1")
    assert not store.is_local
    entry = store.publish_shard("candidates", 0, table(), schema.CANDIDATES, key="k")
    assert entry["state"] == COMPLETE
    assert store.shard_done("candidates", 0, "k") and not store.shard_done("candidates", 0, "other")
    assert store.read_stage("candidates").equals(table())
    assert store.url("candidates").startswith("s3://m3po/runs/r1/")
    # nothing left under a temporary name
    assert not [p for p in store.fs.find(store.path("")) if "/.tmp-" in p]


def test_images_and_model_dirs_roundtrip_through_s3(s3_root, tmp_path, monkeypatch):
    store = RunStore(s3_root, "r2")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    store.write_bytes("images/a.png", buf.getvalue())
    assert load_image(store.url("images/a.png"), "test").getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(Exception, match="images/missing.png"):
        load_image(store.url("images/missing.png"), "test row 3")

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    store.put_dir(src, "_models/m", shared=True)
    assert store.dir_complete("_models/m", shared=True)
    monkeypatch.setenv("M3PO_CACHE", str(tmp_path / "cache"))
    local = store.local_dir("_models/m", shared=True)
    assert (tmp_path / "cache") in __import__("pathlib").Path(local).parents
    assert open(f"{local}/sub/w.bin", "rb").read() == b"\x00" * 10


def test_a_republished_directory_replaces_the_cached_local_copy(s3_root, tmp_path, monkeypatch):
    store = RunStore(s3_root, "r3")
    monkeypatch.setenv("M3PO_CACHE", str(tmp_path / "cache"))
    for version in (b"v1", b"v2"):  # e.g. an adapter retrained under the same run
        src = tmp_path / f"adapter-{version.decode()}"
        src.mkdir()
        (src / "weights.bin").write_bytes(version)
        store.put_dir(src, "adapter")
        assert open(f"{store.local_dir('adapter')}/weights.bin", "rb").read() == version


@pytest.fixture
def flaky_store(s3_server, monkeypatch):
    """A RunStore whose s3fs talks to S3 through a proxy that fails requests on demand."""
    import s3fs
    from flaky_s3 import FlakyS3Proxy

    proxy = FlakyS3Proxy(s3_server["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")   # botocore gives up fast: our own retry is exercised too
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy, RunStore("s3://m3po/flaky", "r1")
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def test_transient_storage_errors_are_retried_and_the_shard_lands_whole(flaky_store):
    proxy, store = flaky_store
    proxy.fail_next(3, "503", method="PUT")          # throttled uploads
    proxy.fail_next(2, "drop", method="GET")         # connections reset mid-request
    entry = store.publish_shard("candidates", 0, table(6), schema.CANDIDATES, key="k")
    assert store.shard_done("candidates", 0, "k")
    assert store.read_stage("candidates").equals(table(6))
    assert proxy.injected == 5 and not proxy.plan
    assert entry["rows"] == 6
    assert not [p for p in store.fs.find(store.path("")) if "/.tmp-" in p]


def test_a_storage_outage_fails_loudly_and_keeps_the_published_shard(flaky_store):
    proxy, store = flaky_store
    store.publish_shard("candidates", 0, table(4), schema.CANDIDATES, key="k")
    proxy.outage = True
    with pytest.raises(OSError, match=r"candidates/shard-00000\.parquet: .*\(after 4 tries\)"):  # the object named
        store.publish_shard("candidates", 0, table(6), schema.CANDIDATES, key="k2")
    proxy.outage = False
    assert store.shard_done("candidates", 0, "k") and not store.shard_done("candidates", 0, "k2")
    assert store.read_stage("candidates").equals(table(4))     # the earlier version, whole


def test_many_processes_fetching_one_model_dir_at_once_all_get_it_whole(s3_root, tmp_path, monkeypatch):
    """Shard runs on one machine fetch the same model directory into the local cache at the same
    time (and again after a newer version is published): every caller gets a whole, current copy."""
    import threading

    monkeypatch.setenv("M3PO_CACHE", str(tmp_path / "cache"))
    store = RunStore(s3_root, "r-cache")
    for version in ("v1", "v2"):
        src = tmp_path / version
        src.mkdir()
        for i in range(20):
            (src / f"part-{i}.bin").write_bytes(version.encode() * 1000)
        store.put_dir(src, "_models/m", shared=True)
        barrier, results, errors = threading.Barrier(6), [], []

        def fetch():
            try:
                barrier.wait()
                results.append(store.local_dir("_models/m", shared=True))
            except Exception as e:  # noqa: BLE001 (collected, asserted below)
                errors.append(e)

        threads = [threading.Thread(target=fetch) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        local = Path(results[0])
        assert len(set(results)) == 1
        assert sorted(p.name for p in local.iterdir()) == sorted(["_COMPLETE"] + [f"part-{i}.bin" for i in range(20)])
        assert all((local / f"part-{i}.bin").read_bytes() == version.encode() * 1000 for i in range(20))
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]
