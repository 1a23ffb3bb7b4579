"""The fault matrix's rows that run in one process: each takes a finished run of the first three
stages (prompts, candidates, scores) on a small LLaVA-Instruct-format dataset, does one fault to it
(an input changed or out of bounds, a damaged shard, a failing object store, a write that fails
mid-file, a judge that stops answering), runs the stages again, and says what was kept, what was
computed again, what was refused and with which message. `tests/test_fault_matrix.py` asserts each
row; `bench/faults.py` prints them as a table with the rows that need servers and workers.

A row's `recomputed` counts, per stage, the shards the re-runs computed; `rows_lost` counts rows
of the finished run that are neither in the run afterwards nor dropped on purpose and counted.
Limit: the stages run as plain functions (no Prefect), on the tiny models and a loopback judge.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import fsspec
from PIL import Image

from m3po_core.config import load_config
from m3po_core.errors import InputError
from m3po_core.stages import base_models, prompts, sample, score
from m3po_core.store import RunStore
from openai_server import Fault, FakeOpenAIServer, Reply, request_text

TINY = Path(__file__).parent / "tiny.yaml"
RECORDS, SHARD_SIZE = 6, 2            # three shards per stage
STAGES = ("prompts", "candidates", "scores")


def rate(body: dict) -> list[Reply]:
    """The loopback judge: hashed 1-10 ratings, one object per rated candidate."""
    text = request_text(body)
    ids = [int(i) for i in re.findall(r"\n\n\[(\d+)\]\n", text)]
    aspects = ("relevance", "accuracy", "adherence")
    rating = lambda i: {a: 1 + zlib.crc32(f"{text[-60:]}{i}{a}".encode()) % 10 for a in aspects}  # noqa: E731
    if ids:
        return [Reply(json.dumps({"ratings": [{"id": i, **rating(i)} for i in ids]}))]
    return [Reply(json.dumps(rating(0)))]


def judge_server() -> FakeOpenAIServer:
    return FakeOpenAIServer(rate).start()


class Pipeline:
    """Prompts, candidates and scores of one run over its own dataset (`data_root`: `data.json` and
    `images/`), in the store `store_root` (shared by rows: the tiny models are built once there)."""

    def __init__(self, data_root: str, store_root: str, run_id: str, judge_url: str):
        self.data_root, self.store_root, self.run_id, self.judge_url = data_root, store_root, run_id, judge_url
        self.fs, self.base = fsspec.core.url_to_fs(data_root)
        self.store = RunStore(store_root, run_id)
        self.cfg = load_config(TINY, self.cfg_overrides())
        self.records: list[dict] = []

    def cfg_overrides(self) -> list[str]:
        """tests/tiny.yaml on this dataset, the loopback judge rating."""
        return ["data.source=llava_instruct", f"data.path={self.data_root}/data.json",
                f"data.image_root={self.data_root}/images", f"data.shard_size={SHARD_SIZE}",
                "scoring.judge=openai:judge", f"scoring.judge_base_url={self.judge_url}", "evaluation.benchmarks=[]"]

    def write_dataset(self, green: int = 0) -> None:
        """`green` tints every image: a run whose judge requests no other row's cache answers."""
        self.fs.makedirs(f"{self.base}/images", exist_ok=True)
        for i in range(RECORDS):
            self.write_image(i, (40 * i, green, 0))
        self.records = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is square {i}?"}, {"from": "gpt", "value": "Red."}]}
            for i in range(RECORDS)]
        self.write_records()

    def write_image(self, i: int, colour: tuple[int, int, int]) -> None:
        with self.fs.open(f"{self.base}/images/{i}.png", "wb") as f:
            Image.new("RGB", (8, 8), colour).save(f, format="PNG")

    def write_records(self) -> None:
        with self.fs.open(f"{self.base}/data.json", "w") as f:
            f.write(json.dumps(self.records))

    def run(self) -> dict[str, int]:
        """Every stage once; the shards each computed (a prompts shard: written because its rows changed)."""
        n = prompts.prepare_prompts(self.cfg, self.store)
        computed = {"prompts": self.store.read_json("prompts/_stage.json")["shards_written"]}
        model_ref = base_models.ensure_base_model(self.cfg, self.store)
        clip_ref = base_models.ensure_clip(self.cfg, self.store)
        computed["candidates"] = sum(not sample.sample_shard(self.cfg, self.store, s, model_ref).cached
                                     for s in range(n))
        computed["scores"] = sum(not score.score_shard(self.cfg, self.store, s, clip_ref).cached for s in range(n))
        return computed

    def snapshot(self) -> dict[str, Any]:
        """Each published shard's SHA-256 and the row identities it holds (read through its checksum)."""
        shards, rows = {}, set()
        for stage in STAGES:
            for e in self.store.manifest(stage):
                if e["state"] != "complete":
                    continue
                shards[(stage, e["shard"])] = e["sha256"]
                table = self.store.read_shard(stage, e["shard"]).to_pylist()
                rows |= {(stage, r["prompt_id"], r.get("cand_idx")) for r in table}
        return {"shards": shards, "rows": rows}

    def leftovers(self) -> list[str]:
        """Half-written files: a publish writes a temporary object first and renames it."""
        fs, base = fsspec.core.url_to_fs(self.store.path(""))
        return [p for p in fs.find(base) if "/.tmp-" in p]


def finished(work: Path, store_root: str, name: str, judge: FakeOpenAIServer, data_root: str | None = None,
             green: int = 0) -> Pipeline:
    p = Pipeline(data_root or str(work / name), store_root, name, judge.base_url)
    p.write_dataset(green)
    p.run()
    return p


def outcome(p: Pipeline, before: dict, recomputed: dict[str, int], dropped: set = frozenset(), **facts) -> dict:
    after = p.snapshot()
    lost = before["rows"] - after["rows"] - set(dropped)
    kept = sum(1 for k, sha in before["shards"].items() if after["shards"].get(k) == sha)
    return {"recomputed": recomputed, "rows_before": len(before["rows"]), "rows_lost": len(lost),
            "rows_dropped": len(dropped), "shards_kept": kept, "half_written": len(p.leftovers()), **facts}


def refused(call: Callable[[], Any], kind: type[BaseException] = Exception) -> str:
    try:
        call()
    except kind as e:
        return str(e).splitlines()[0][:160]
    raise AssertionError("the fault was not refused")


def _rows_of(before: dict, record_id: str) -> set:
    return {r for r in before["rows"] if r[1].startswith(f"{record_id}-t")}  # prompt ids: {id}-t{turn}


# ---------------------------------------------------------------------------------------- rows
def image_replaced(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """An image replaced in place by another decodable one: its shard, downstream included."""
    p = finished(work, store_root, "image-replaced", judge)
    before = p.snapshot()
    p.write_image(3, (0, 200, 0))
    return outcome(p, before, p.run())


def record_edited(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """An instruction edited in the LLaVA-Instruct JSON at the same path."""
    p = finished(work, store_root, "record-edited", judge)
    before = p.snapshot()
    p.records[4]["conversations"][0]["value"] = "<image>\nIs the square dark?"
    p.write_records()
    return outcome(p, before, p.run())


def reference_outside_root(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """A record whose image leaves the image root (`../secret.png`): refused by file and record;
    the run is unchanged, and with the record mended nothing is computed again."""
    p = finished(work, store_root, "outside-root", judge)
    before = p.snapshot()
    Image.new("RGB", (8, 8)).save(Path(p.base) / "secret.png")
    original = p.records[2]["image"]
    p.records[2]["image"] = "../secret.png"
    p.write_records()
    message = refused(p.run, InputError)
    p.records[2]["image"] = original
    p.write_records()
    return outcome(p, before, p.run(), message=message)


def decompression_bomb(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """An image replaced by 8000x7000 one-bit pixels (56 MP): never decoded, its prompt dropped and
    counted. Shards are cut by position, so the prompts after it move: its shard and the later ones."""
    p = finished(work, store_root, "bomb", judge)
    before = p.snapshot()
    with p.fs.open(f"{p.base}/images/3.png", "wb") as f:
        Image.new("1", (8000, 7000)).save(f, format="PNG")
    recomputed = p.run()
    counted = p.store.read_json("prompts/_stage.json")["filter"]["image_too_large"]
    return outcome(p, before, recomputed, dropped=_rows_of(before, "r3"), counted=counted)


def corrupted_shard(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """A published candidates shard whose bytes changed in the store: its read is refused by
    checksum, a re-run computes only it (the same bytes again: the scores below it stay)."""
    p = finished(work, store_root, "corrupted", judge)
    before = p.snapshot()
    path = Path(p.store.path(RunStore.shard_rel("candidates", 1)))
    good = path.read_bytes()
    path.write_bytes(good[:200] + bytes(b ^ 0xFF for b in good[200:240]) + good[240:])
    message = refused(lambda: p.store.read_shard("candidates", 1), InputError)
    return outcome(p, before, p.run(), message=message.split("/")[-1], same_bytes=path.read_bytes() == good)


def flaky_store(work: Path, proxy, judge: FakeOpenAIServer) -> dict:
    """Object store (S3 on loopback, through a proxy): 503 SlowDown on uploads and dropped
    connections on reads while a replaced image's shards are computed again."""
    p = finished(work, "s3://m3po/faults", "flaky", judge, data_root=str(work / "flaky"))
    before = p.snapshot()
    p.write_image(3, (0, 200, 0))
    proxy.fail_next(3, "503", method="PUT")
    proxy.fail_next(2, "drop", method="GET")
    recomputed = p.run()
    return outcome(p, before, recomputed, injected=proxy.injected, pending=len(proxy.plan))


def store_outage(work: Path, proxy, judge: FakeOpenAIServer) -> dict:
    """The object store goes away while a replaced image's shards are computed: the run fails
    loudly, the published shards stay whole; once it is back, a re-run computes just those."""
    p = finished(work, "s3://m3po/faults", "outage", judge, data_root=str(work / "outage"))
    before = p.snapshot()
    p.write_image(3, (0, 200, 0))
    proxy.outage = True
    try:
        message = refused(p.run, OSError)
    finally:
        proxy.outage = False
    during = outcome(p, before, {})
    return {**outcome(p, before, p.run(), message=message), "rows_lost_during": during["rows_lost"]}


def write_fails(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """A write that fails mid-file, as on a full disk (here a file-size limit: EFBIG at the same
    point ENOSPC would come): the stages run again in a process that cannot write more than a few
    hundred bytes per file; nothing published is touched, nothing half-written is left."""
    p = finished(work, store_root, "write-fails", judge)
    before = p.snapshot()
    p.write_image(3, (0, 200, 0))
    child = subprocess.run([sys.executable, __file__, "run", p.data_root, store_root, p.run_id, judge.base_url],
                           capture_output=True, text=True, preexec_fn=_small_files, env=_child_env(), timeout=600)
    message = (child.stderr.strip().splitlines() or ["(nothing)"])[-1][:160]
    during = outcome(p, before, {})
    return {**outcome(p, before, p.run(), message=message, child_exit=child.returncode),
            "rows_lost_during": during["rows_lost"], "half_written_during": during["half_written"]}


def judge_revoked(work: Path, store_root: str, judge: FakeOpenAIServer) -> dict:
    """A score shard published with unrated candidates (the judge kept answering 503 for one
    prompt); its retry meets a revoked key (401): the shard and its record, spending included,
    stay as published and the record says why; with the key back, only that shard is rated again."""
    judge.fail_when("What colour is square 3?", Fault("status", status=503, headers={"retry-after-ms": "5"}))
    try:
        p = finished(work, store_root, "judge-revoked", judge, green=77)  # the judge's cache knows none of it
    finally:
        judge.heal()
    before = p.snapshot()
    published = p.store.shard_entry("scores", 1)
    judge.fail_when("", Fault("status", status=401))
    try:
        message = refused(p.run)
    finally:
        judge.heal()
    kept = p.store.shard_entry("scores", 1)
    same_record = {k: v for k, v in kept.items() if k != "last_retry"} == published
    return outcome(p, before, p.run(), message=message, unrated_before=published["unrated"],
                   record_kept=same_record, last_retry=kept.get("last_retry", {}).get("error", "")[:80],
                   unrated_after=p.store.shard_entry("scores", 1)["unrated"])


# Each row: its function, whether it needs the S3 proxy, and what it must show.
ROWS: dict[str, tuple[Callable, bool, dict[str, Any]]] = {
    "image replaced in place": (image_replaced, False, {"recomputed": {"prompts": 1, "candidates": 1, "scores": 1}}),
    "instruction edited in the JSON": (record_edited, False,
                                       {"recomputed": {"prompts": 1, "candidates": 1, "scores": 1}}),
    "image reference outside its root": (reference_outside_root, False,
                                         {"recomputed": {"prompts": 0, "candidates": 0, "scores": 0}}),
    "decompression bomb": (decompression_bomb, False,
                           {"recomputed": {"prompts": 2, "candidates": 2, "scores": 2}, "counted": 1}),
    "published shard corrupted": (corrupted_shard, False,
                                  {"recomputed": {"prompts": 0, "candidates": 1, "scores": 0}, "same_bytes": True}),
    "object store 503s and dropped connections": (flaky_store, True,
                                                  {"recomputed": {"prompts": 1, "candidates": 1, "scores": 1},
                                                   "injected": 5, "pending": 0}),
    "object store outage mid-stage": (store_outage, True, {"recomputed": {"prompts": 1, "candidates": 1, "scores": 1},
                                                          "rows_lost_during": 0}),
    "a write fails mid-file (full disk)": (write_fails, False,
                                           {"recomputed": {"prompts": 1, "candidates": 1, "scores": 1},
                                            "rows_lost_during": 0, "half_written_during": 0}),
    "judge retry fails (401)": (judge_revoked, False, {"recomputed": {"prompts": 0, "candidates": 0, "scores": 1},
                                                       "record_kept": True, "unrated_before": 4,  # n = 4: one prompt's
                                                       "unrated_after": 0}),
}


def check(name: str, row: dict) -> list[str]:
    """What in `row` differs from what its fault must show (and from 0 rows lost, 0 half-written)."""
    expect = {**ROWS[name][2], "rows_lost": 0, "half_written": 0}
    return [f"{k}: {row.get(k)!r}, expected {v!r}" for k, v in expect.items() if row.get(k) != v]


# ---------------------------------------------------------------------- the write-fails child
FILE_LIMIT = 600  # bytes: manifests and leases fit, no Parquet shard does


def _small_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _child_env() -> dict[str, str]:
    here = str(Path(__file__).parent)
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    data_root, store_root, run_id, url = sys.argv[2:6]
    Pipeline(data_root, store_root, run_id, url).run()
