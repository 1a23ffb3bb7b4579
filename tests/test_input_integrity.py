"""Inputs stay in their roots and every key sees content: image references confined to their root,
decompression bombs refused by name, and an image replaced in place or an edited instruction file
recomputing exactly the prompts shards that hold it (local disk and the loopback S3 server)."""
import json
import os
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from m3po_core.config import load_config
from m3po_core.data.images import MAX_IMAGE_PIXELS, load_image, resolve_image_ref
from m3po_core.data.llava_instruct import load_llava_instruct
from m3po_core.data.quality import QualityFilterConfig, quality_filter
from m3po_core.errors import InputError
from m3po_core.stages import prompts as prompts_step
from m3po_core.store import RunStore

TINY = Path(__file__).parent / "tiny.yaml"


@pytest.mark.parametrize("name", ["../secret.png", "a/../../secret.png", "/etc/passwd", "s3://other-bucket/x.png",
                                  "file:///etc/passwd", "http://example.com/x.png", "C:/x.png", "..\\x.png", ""])
def test_a_reference_leaving_its_root_is_refused_naming_the_record(tmp_path, name):
    with pytest.raises(InputError, match="llava.json: record 0"):
        resolve_image_ref(str(tmp_path), name, "llava.json: record 0 (id 'x')")


def test_references_inside_the_root_resolve(tmp_path):
    assert resolve_image_ref(str(tmp_path), "coco/a/../b.jpg", "w") == f"{tmp_path}/coco/b.jpg"
    assert resolve_image_ref("s3://bucket/data", "sam/1.jpg", "w") == "s3://bucket/data/sam/1.jpg"


def test_a_symlink_leading_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "home"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "innocent.png")
    os.symlink(outside, root / "dir")
    for name in ("innocent.png", "dir/secret.png"):
        with pytest.raises(InputError, match="outside the image root"):
            resolve_image_ref(str(root), name, "record 3")
    records = [{"id": "x", "image": "innocent.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                       {"from": "gpt", "value": "A."}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"d\.json: record 0 \(id 'x'\): image 'innocent.png' is a link"):
        load_llava_instruct(str(tmp_path / "d.json"), str(root))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """8000x7000 one-bit pixels: a few kilobytes of PNG that would decode to 56 megapixels."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 7000)).save(bomb)
    assert bomb.stat().st_size < 100_000 and 8000 * 7000 > MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"bomb\.png: image of 8000x7000 pixels is over the limit .*prompt p9"):
        load_image(str(bomb), "prompt p9")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    rows = [{"prompt_id": "p0", "image": str(bomb), "instruction": "What is shown?"},
            {"prompt_id": "p1", "image": str(tmp_path / "ok.png"), "instruction": "What is shown?"}]
    kept, stats = quality_filter(rows, QualityFilterConfig())
    assert [r["prompt_id"] for r in kept] == ["p1"] and stats["image_too_large"] == 1
    assert stats["examples"]["image_too_large"] == ["p0"] and kept[0]["image_sha256"]


def test_an_image_changed_after_the_prompts_stage_is_refused_by_name(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    import hashlib
    digest = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert load_image(str(tmp_path / "a.png"), "row 0", sha256=digest).size == (4, 4)
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "a.png")
    with pytest.raises(InputError, match=r"a\.png: the image changed after the prompts stage read it \(row 0\)"):
        load_image(str(tmp_path / "a.png"), "row 0", sha256=digest)


def _dataset(root: str, n: int = 5) -> list[dict]:
    fs, base = fsspec.core.url_to_fs(root)
    fs.makedirs(f"{base}/images", exist_ok=True)
    records = []
    for i in range(n):
        with fs.open(f"{base}/images/{i}.png", "wb") as f:
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(f, format="PNG")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is square {i}?"}, {"from": "gpt", "value": "Red."}]})
    with fs.open(f"{base}/data.json", "w") as f:
        f.write(json.dumps(records))
    return records


def _run(root: str, store: RunStore) -> tuple[dict, dict]:
    cfg = load_config(TINY, ["data.source=llava_instruct", f"data.path={root}/data.json",
                             f"data.image_root={root}/images", "data.shard_size=2", "scoring.judge=openai:judge",
                             "evaluation.benchmarks=[]"])
    prompts_step.prepare_prompts(cfg, store)
    return store.read_json("prompts/_stage.json"), {e["shard"]: e["sha256"] for e in store.manifest("prompts")}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replaced_image_or_an_edited_record_rewrites_exactly_its_shard(tmp_path, where, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        root, store = f"s3://m3po/integrity-{tmp_path.name}", RunStore(f"s3://m3po/integrity-{tmp_path.name}", "run")
    else:
        root, store = str(tmp_path / "data"), RunStore(str(tmp_path / "store"), "run")
    records = _dataset(root)
    record, first = _run(root, store)
    assert (record["n_shards"], record["shards_written"], record["filter"]["images_read"]) == (3, 3, 5)
    # nothing changed: nothing read again, nothing written
    record, again = _run(root, store)
    assert again == first and record["shards_written"] == 0 and record["filter"]["images_read"] == 0
    # image 3 (shard 1) replaced in place by another decodable image
    fs, base = fsspec.core.url_to_fs(root)
    with fs.open(f"{base}/images/3.png", "wb") as f:
        Image.new("RGB", (8, 8), (0, 200, 0)).save(f, format="PNG")
    record, after = _run(root, store)
    assert record["shards_written"] == 1 and record["filter"]["images_read"] == 1
    assert {s for s in first if first[s] != after[s]} == {1}
    # an edited instruction in record 4 (shard 2): the file's identity changes, only shard 2 is written
    records[4]["conversations"][0]["value"] = "<image>\nIs the square dark?"
    with fs.open(f"{base}/data.json", "w") as f:
        f.write(json.dumps(records))
    record, edited = _run(root, store)
    assert record["shards_written"] == 1 and {s for s in after if after[s] != edited[s]} == {2}
    rows = prompts_step.read_prompts_shard(store, 1)
    import hashlib
    assert rows[1]["image_sha256"] == hashlib.sha256(fs.cat(f"{base}/images/3.png")).hexdigest()


@pytest.mark.parametrize("damage", ["bad bytes", "truncated", "another table"])
def test_a_corrupted_shard_is_never_read_and_a_rerun_recomputes_only_it(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3po_core.stages.runner import run_shard

    store = RunStore(str(tmp_path), "corrupt")
    schema = pa.schema([("prompt_id", pa.string()), ("value", pa.float64())])
    computed = []

    def compute(shard):
        def table():
            computed.append(shard)
            return pa.Table.from_pylist([{"prompt_id": f"p{shard}-{i}", "value": float(i)} for i in range(4)], schema)
        return table

    for shard in range(3):
        run_shard(store, "toy", shard, "k", compute(shard), schema)
    path = Path(store.path(RunStore.shard_rel("toy", 1)))
    good = path.read_bytes()
    if damage == "bad bytes":
        path.write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:120]) + good[120:])
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        pq.write_table(pa.table({"something": ["else"]}), path)
    with pytest.raises(InputError, match=r"toy/shard-00001\.parquet: its bytes do not match the SHA-256"):
        store.read_shard("toy", 1)
    with pytest.raises(InputError, match="toy/shard-00001"):
        store.read_stage("toy", 3)
    computed.clear()
    for shard in range(3):
        run_shard(store, "toy", shard, "k", compute(shard), schema)
    assert computed == [1] and store.read_shard("toy", 1).num_rows == 4 and path.read_bytes() == good
