"""What invalidates a cache, and how a shard is run against it: the one place that decides both.

A stage's output is cached under a key built from what decides its content: the stage's code version
(`CODE_VERSION`), the configuration fields that declare the stage (`stage_config`, from
m3po_core/config/invalidation.py) and the content hashes of its inputs (`stage_key`). A shard
complete in the manifest under its key is skipped (`run_shard`), so a re-run computes only what
changed or failed, whichever worker or flow run computed the rest. Limit: inputs are hashed as the
caller names them; a caller that hashes a reference instead of the referenced bytes gets a key that
does not see those bytes change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from m3po_core.config import RunConfig
from m3po_core.config.invalidation import INTRODUCED_AT, fields_of
from m3po_core.errors import Interrupted
from m3po_core.store import COMPLETE, FAILED, RUNNING, RunStore, retry_unrated

log = logging.getLogger("m3po.runner")

# Bump a stage's version when its code changes what it writes: it is part of the cache key.
CODE_VERSION = {"prompts": 2, "base_model": 1, "clip": 1, "candidates": 1, "scores": 2, "pairs": 2,
                "train": 1, "evaluate": 3, "ipa": 1, "candidates_round": 1, "scores_round": 1}

# One model computation at a time per process: the accelerator (or the CPU's cores) is the shared
# resource, and HF sampling seeds torch's global generator.
DEVICE_LOCK = threading.RLock()
_waited = threading.local()  # seconds this thread spent queueing for the device in the current shard
# Set on Ctrl-C (the CLI): only the main thread sees KeyboardInterrupt, so shards on the task
# runner's threads check this before they start; those already running finish and are kept.
STOP = threading.Event()


@contextmanager
def device_slot():
    """Hold the device; the time spent waiting for it is not the shard's compute time."""
    t0 = time.time()
    with DEVICE_LOCK:
        _waited.seconds = getattr(_waited, "seconds", 0.0) + time.time() - t0
        yield


# -------------------------------------------------------------------------------------------------
# Cache keys


def fingerprint(obj: Any) -> str:
    """Short stable hash of any JSON-able value (dataclasses included)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_config(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The part of the configuration that decides a stage's output, what goes into its cache key:
    the value of every field that declares the stage (m3po_core/config/invalidation.py), by its
    dotted name; a field still at the value it was introduced at (`INTRODUCED_AT`) is left out."""
    tree = cfg.to_dict()

    def value(dotted: str) -> Any:
        node = tree
        for part in dotted.split("."):
            node = node[part]
        return node

    values = {name: value(name) for name in fields_of(stage)}
    return {name: v for name, v in values.items() if name not in INTRODUCED_AT or v != INTRODUCED_AT[name]}


def stage_key(cfg: RunConfig, stage: str, *inputs: Any) -> str:
    return fingerprint({"stage": stage, "version": CODE_VERSION[stage], "config": stage_config(cfg, stage),
                        "inputs": list(inputs)})


def done_record(store: RunStore, rel: str, key: str) -> dict[str, Any] | None:
    """A whole-stage record (JSON holding its cache key) if it was written under `key`, read once."""
    try:
        record = store.read_json(rel)
    except FileNotFoundError:
        return None
    return record if record.get("key") == key else None


# -------------------------------------------------------------------------------------------------
# Running a shard


@dataclass(frozen=True)
class ShardResult:
    stage: str
    shard: int
    rows: int
    cached: bool
    seconds: float


_HELD: set[tuple[str, str, int]] = set()  # the leases this process renews now


@contextmanager
def shard_lease(store: RunStore, stage: str, shard: int, seconds: float | None):
    """While the block runs, the shard's lease record (`{stage}/_leases/`: host, pid, renewed_at)
    is renewed every `seconds` / 4, so a fan-out can tell a shard whose worker died from a slow one
    (flows/machinery/remote_shards.py). A renewal that fails is logged and tried again at the next beat."""
    held = (store.base, stage, shard)
    if not seconds or held in _HELD:  # an outer block (the remote job, slot wait included) renews it
        yield
        return
    _HELD.add(held)
    rel = RunStore.lease_rel(stage, shard)
    record = {"stage": stage, "shard": shard, "host": socket.gethostname(), "pid": os.getpid(),
              "lease_seconds": seconds}
    store.write_json(rel, {**record, "renewed_at": time.time()})
    done = threading.Event()

    def beat() -> None:
        while not done.wait(seconds / 4):
            try:
                store.write_json(rel, {**record, "renewed_at": time.time()})
            except Exception as e:  # noqa: BLE001 (the next beat tries again; the lease tolerates a missed one)
                log.warning("%s shard %d: lease not renewed: %s", stage, shard, e)

    thread = threading.Thread(target=beat, name=f"lease-{stage}-{shard}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        _HELD.discard(held)
        thread.join(timeout=seconds)


def run_shard(store: RunStore, stage: str, shard: int, key: str, compute: Callable[[], pa.Table],
              table_schema: pa.Schema, extra: Callable[[], dict[str, Any]] | None = None,
              lease_seconds: float | None = None, stale: Callable[[dict[str, Any]], bool] | None = None) -> ShardResult:
    """Skip a shard complete under `key`; otherwise compute it, publish it whole, or record the failure.

    A shard already published (with rows a judge left unrated, or under another key) and computed
    again keeps its record while it runs and if it fails: the failure is added to that record as
    `last_retry` (error, key, time) and the published file, its rows and what the judge cost stay as
    they were. Only a shard with nothing intact published is marked running, then failed. `stale`:
    whether a record complete under `key` must be computed again all the same (a larger judge budget)."""
    t0 = time.time()
    entry = store.shard_entry(stage, shard)  # read once: done (as RunStore.shard_done decides) or published
    published = entry if entry and entry.get("state") == COMPLETE and store.shard_intact(stage, shard, entry) else None
    if published is not None and published.get("key") == key and not retry_unrated(published) \
            and not (stale and stale(published)):
        return ShardResult(stage, shard, published["rows"], True, 0.0)
    if STOP.is_set():
        raise Interrupted(f"{stage} shard {shard} not started: the run was interrupted")
    if published is None:
        store.mark_shard(stage, shard, RUNNING, key)
    _waited.seconds = 0.0
    try:
        with shard_lease(store, stage, shard, lease_seconds):
            table = compute()
        wall = time.time() - t0
        entry = store.publish_shard(stage, shard, table, table_schema, key, seconds=wall - _waited.seconds,
                                    wall_seconds=wall, host=socket.gethostname(), pid=os.getpid(),
                                    **(extra() if extra else {}))
    except BaseException as e:  # KeyboardInterrupt too: the manifest must say the shard is not done
        error = f"{type(e).__name__}: {e}"
        if published is not None:
            store.write_entry(stage, shard, {**published, "last_retry": {"error": error, "key": key, "at": time.time()}})
        else:
            store.mark_shard(stage, shard, FAILED, key, error=error)
        raise
    return ShardResult(stage, shard, entry["rows"], False, entry["seconds"])
