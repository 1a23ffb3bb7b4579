"""A run's layout in object storage: `{root}/{run_id}/` on any fsspec URL.

Layout:
    prompts/shard-00000.parquet ...      candidates/shard-*.parquet    scores/shard-*.parquet
    rounds/{candidates,scores}-rNN/      adaptive sampling's rounds (round_stage), each a sharded stage
    {stage}/_manifest/shard-00000.json   one record per shard: state, key, rows, sha256, error,
                                         unrated, attempts (rows a judge could not rate: re-runs
                                         retry them until RATING_ATTEMPTS attempts)
    pairs.parquet  metrics.json  report.md  plots/*.png  adapter/  eval/...
    {root}/_models/{name}-{fingerprint}/  models built here (tiny LLaVA, tiny CLIP), shared by runs

Writes are atomic: a file is written aside under a temporary name and then moved into place, so a
reader sees the whole file or none. A shard's manifest record is written after its file, one record
per shard so that workers on different machines never write the same object.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from m3po_core.errors import ArgumentError, InputError

log = logging.getLogger("m3po.store")
VERSION_FIELDS = ("ETag", "etag", "generation", "version_id", "LastModified", "last_modified", "updated")
T = TypeVar("T")

COMPLETE, FAILED, RUNNING = "complete", "failed", "running"


def _retry(fn: Callable[[], T], what: str, attempts: int = 4) -> T:
    """Retry transient storage errors (network, throttling) with backoff; not missing files."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except OSError as e:
            # a full disk or quota does not clear in seconds; the object at fault named (an object
            # store's error often does not)
            if i == attempts - 1 or e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OSError(e.errno, f"{what}: {e.strerror or e} (after {i + 1} tries)") from e
            log.warning("storage error on %s (%s); retrying", what, e)
            time.sleep(0.5 * 2**i)
    raise AssertionError("unreachable")


RATING_ATTEMPTS = 3  # runs that try to rate what a judge left unrated, before the gaps are kept


def retry_unrated(record: dict[str, Any]) -> bool:
    """A shard or metrics record with judge-unrated rows that has not used up its attempts."""
    unrated = record.get("unrated", record.get("judge_usage", {}).get("unrated", 0))  # older records: in the usage
    return bool(unrated) and record.get("attempts", 1) < RATING_ATTEMPTS


def check_run_id(run_id: str | None, what: str = "run id") -> str:
    """A run id names a folder, flow runs and Prefect artifact keys: letters, digits, '_' and '-'."""
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", run_id):
        raise ArgumentError(f"{what} {run_id!r} must be a name of 1-100 letters, digits, '_' and '-' "
                            "(it names a folder under the root)")
    return run_id


def check_root(root: str, what: str = "root") -> str:
    """A root is a directory or an fsspec URL whose file system is installed; a local one must not
    be a file. Reaching it (credentials, network) is left to the run."""
    try:
        fs, path = url_to_fs(str(root))
    except (ValueError, ImportError) as e:
        raise ArgumentError(f"{what} {root!r}: not a directory or a URL this installation can open ({e})") from None
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocol and os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"{what} {root!r} is a file, not a directory")
    return root


class RunStore:
    def __init__(self, root: str, run_id: str):
        check_run_id(run_id)
        self.root = str(root).rstrip("/")
        self.run_id = run_id
        self.fs, root_path = url_to_fs(self.root)
        if self.is_local:
            root_path = os.path.abspath(root_path)
        self._root_path = root_path.rstrip("/")
        self.base = f"{self._root_path}/{run_id}"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def shared_path(self, rel: str) -> str:
        """A path beside the runs, for artefacts that many runs share (models built here)."""
        return f"{self._root_path}/{rel}"

    def url(self, rel: str = "", shared: bool = False) -> str:
        p = self.shared_path(rel) if shared else self.path(rel)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    def exists(self, rel: str) -> bool:
        return _retry(lambda: self.fs.exists(self.path(rel)), rel)

    # -- atomic files --------------------------------------------------------------------------
    def _put_bytes(self, full: str, data: bytes) -> None:
        parent = full.rsplit("/", 1)[0]
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{full.rsplit('/', 1)[1]}"

        def put() -> None:
            self.fs.makedirs(parent, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, full)  # a rename on local disks; object stores publish on completion

        try:
            _retry(put, full)
        finally:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError as e:  # the store is down: its error is the one to report, not this one
                log.warning("could not remove %s (%s)", tmp, e)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._put_bytes(self.path(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        return _retry(lambda: self.fs.cat_file(self.path(rel)), rel)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table, schema: pa.Schema | None = None,
                    row_group_size: int | None = None) -> dict[str, Any]:
        """Write a Parquet file atomically; returns its row count and content hash. `row_group_size`:
        rows per row group (a reader can then read a few rows without the whole file)."""
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        data = buf.getvalue()
        self.write_bytes(rel, data)
        return {"rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()}

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)), columns=columns)

    @contextlib.contextmanager
    def parquet_file(self, rel: str) -> Iterator[pq.ParquetFile]:
        """A Parquet file opened for reading parts of it (row groups, columns) with ranged reads,
        not its whole bytes: what a page of a large table reads. Closed when the block ends."""
        f = _retry(lambda: self.fs.open(self.path(rel), "rb"), rel)
        try:
            yield pq.ParquetFile(f)
        finally:
            f.close()

    def read_shard(self, stage: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        """A complete shard's table, its bytes checked against the SHA-256 in its manifest record
        first: a shard corrupted after it was published (bad bytes, a truncated or foreign file) is
        never parsed; a re-run computes it again (`shard_done` sees the same mismatch)."""
        rel = self.shard_rel(stage, shard)
        entry = self.shard_entry(stage, shard)
        if not entry or entry.get("state") != COMPLETE:
            raise InputError(f"{self.url(rel)}: {stage} shard {shard} is not complete "
                             f"({(entry or {}).get('state', 'no record')})")
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            raise InputError(f"{self.url(rel)}: the file of complete {stage} shard {shard} is missing; "
                             "a re-run computes it again") from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise InputError(f"{self.url(rel)}: its bytes do not match the SHA-256 of its manifest record (changed "
                             f"or corrupted after it was published); not read. A re-run computes {stage} shard "
                             f"{shard} again")
        return pq.read_table(io.BytesIO(data), columns=columns)

    # -- shards and their manifest -------------------------------------------------------------
    @staticmethod
    def shard_rel(stage: str, shard: int) -> str:
        return f"{stage}/shard-{shard:05d}.parquet"

    @staticmethod
    def _entry_rel(stage: str, shard: int) -> str:
        return f"{stage}/_manifest/shard-{shard:05d}.json"

    def shard_entry(self, stage: str, shard: int) -> dict[str, Any] | None:
        try:
            return self.read_json(self._entry_rel(stage, shard))
        except FileNotFoundError:
            return None

    def manifest(self, stage: str) -> list[dict[str, Any]]:
        """Every shard record of a stage, in shard order: one listing, then the records read at
        once (concurrently on object stores: thousands of records are not thousands of round trips)."""
        pattern = self.path(f"{stage}/_manifest/shard-*.json")
        files = sorted(_retry(lambda: self.fs.glob(pattern), pattern))
        found = self._cat_many(files)
        return [json.loads(found[f]) for f in files if f in found]

    def round_stages(self, kind: str) -> list[str]:
        """The adaptive rounds' stages of this kind ("candidates" or "scores") the run has, in round
        order: rounds/scores-r00, rounds/scores-r01, ... (m3po_core/stages/adaptive_rounds.py)."""
        found = _retry(lambda: self.fs.glob(self.path(f"rounds/{kind}-r*")), f"rounds/{kind}-r*")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in found}
        return sorted(f"rounds/{n}" for n in names if re.fullmatch(rf"{kind}-r\d+", n))

    def manifest_versions(self, stage: str) -> dict[int, str | None]:
        """shard -> a version of its record, from one listing and no reads: the object's ETag (or
        generation) on object stores, its inode and modification time on a local disk; None where
        the file system's listing has none (the record must then be read). A record rewritten gets
        a new version, so a reader that keeps the records it has read re-reads only what changed."""
        pattern = self.path(f"{stage}/_manifest/shard-*.json")
        listed = _retry(lambda: self.fs.glob(pattern, detail=True), pattern)
        out = {}
        for path, info in listed.items():
            m = re.search(r"shard-(\d+)\.json$", path)
            if m:
                # a local record is renamed into place whole: a new inode each time it is written
                local = f"{info['ino']}:{info['mtime']}" if "ino" in info and "mtime" in info else None
                stamp = next((info[k] for k in VERSION_FIELDS if info.get(k)), None) or local
                out[int(m.group(1))] = None if stamp is None else f"{info.get('size')}:{stamp}"
        return out

    @staticmethod
    def lease_rel(stage: str, shard: int) -> str:
        return f"{stage}/_leases/shard-{shard:05d}.json"

    def leases(self, stage: str, shards: list[int]) -> dict[int, dict[str, Any]]:
        """The lease records of these shards (read at once); a shard without one is left out."""
        paths = {self.path(self.lease_rel(stage, s)): s for s in shards}
        return {paths[p]: json.loads(data) for p, data in self._cat_many(list(paths)).items()}

    def shard_entries(self, stage: str, shards: list[int]) -> dict[int, dict[str, Any]]:
        """The records of these shards (read at once, as `manifest`); a shard without one is left out."""
        paths = {self.path(self._entry_rel(stage, s)): s for s in shards}
        return {paths[p]: json.loads(data) for p, data in self._cat_many(list(paths)).items()}

    def _cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """path -> bytes of each of these files that exists. fsspec's `cat` of a list reads them
        concurrently on async file systems (s3fs); transient errors are retried as `_retry` does,
        for the files that had them."""
        out: dict[str, bytes] = {}
        todo = list(paths)
        for attempt in range(4):
            if not todo:
                break
            got = {self.fs._strip_protocol(p): v for p, v in self.fs.cat(todo, on_error="return").items()}
            again = []
            for p in todo:
                v = got.get(self.fs._strip_protocol(p))
                if isinstance(v, bytes):
                    out[p] = v
                elif v is None or isinstance(v, FileNotFoundError):
                    continue  # no record (yet)
                elif isinstance(v, (PermissionError, IsADirectoryError)) or not isinstance(v, OSError) or attempt == 3:
                    raise v
                else:
                    again.append(p)
            if again:
                log.warning("storage error on %d records (e.g. %s); retrying", len(again), again[0])
                time.sleep(0.5 * 2**attempt)
            todo = again
        return out

    def shard_done(self, stage: str, shard: int, key: str) -> bool:
        """Complete under this cache key, and its file is there with the recorded hash. A shard
        published with rows a judge left unrated is readable but not done until it has been tried
        `RATING_ATTEMPTS` times: a re-run computes it again (the judge's cache makes the rated rows
        free), so a recovered judge fills it, and a reply that never parses stops costing requests."""
        entry = self.shard_entry(stage, shard)
        if not entry or entry.get("state") != COMPLETE or entry.get("key") != key or retry_unrated(entry):
            return False
        return self.shard_intact(stage, shard, entry)

    def shard_intact(self, stage: str, shard: int, entry: dict[str, Any]) -> bool:
        """The shard's file is there with the hash its record holds (bad bytes, a truncated or
        foreign file: not intact, so it is computed again and never read)."""
        try:
            data = self.read_bytes(self.shard_rel(stage, shard))
        except FileNotFoundError:
            return False
        return hashlib.sha256(data).hexdigest() == entry.get("sha256")

    def write_entry(self, stage: str, shard: int, entry: dict[str, Any]) -> None:
        """Replace a shard's manifest record as given (a published record kept through a failed retry)."""
        self.write_json(self._entry_rel(stage, shard), entry)

    def publish_shard(self, stage: str, shard: int, table: pa.Table, schema: pa.Schema, key: str,
                      **extra: Any) -> dict[str, Any]:
        info = self.write_table(self.shard_rel(stage, shard), table, schema)
        entry = {"stage": stage, "shard": shard, "state": COMPLETE, "key": key, **info, **extra,
                 "finished_at": time.time()}
        self.write_json(self._entry_rel(stage, shard), entry)
        return entry

    def mark_shard(self, stage: str, shard: int, state: str, key: str, **extra: Any) -> None:
        self.write_json(self._entry_rel(stage, shard),
                        {"stage": stage, "shard": shard, "state": state, "key": key, **extra, "at": time.time()})

    def read_stage(self, stage: str, n_shards: int | None = None) -> pa.Table:
        """All complete shards of a stage as one table (in shard order)."""
        entries = [e for e in self.manifest(stage) if e["state"] == COMPLETE]
        if n_shards is not None:
            missing = sorted(set(range(n_shards)) - {e["shard"] for e in entries})
            if missing:
                raise RuntimeError(f"{self.url(stage)}: shards {missing} are not complete")
            entries = [e for e in entries if e["shard"] < n_shards]
        return pa.concat_tables([self.read_shard(stage, e["shard"]) for e in entries])

    # -- directories (model checkpoints) -------------------------------------------------------
    def put_dir(self, local_dir: str | Path, rel: str, shared: bool = False) -> None:
        """Publish a local directory; a `_COMPLETE` marker written last says it is whole."""
        dest = self.shared_path(rel) if shared else self.path(rel)
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        self.fs.makedirs(dest, exist_ok=True)
        for p in sorted(Path(local_dir).rglob("*")):
            if p.is_file():
                target = f"{dest}/{p.relative_to(local_dir).as_posix()}"
                _retry(lambda p=p, t=target: self.fs.put_file(str(p), t), target)
        # a fresh token per publication: cached local copies compare it to notice a newer version
        self._put_bytes(f"{dest}/_COMPLETE", uuid.uuid4().hex.encode())

    def dir_complete(self, rel: str, shared: bool = False) -> bool:
        dest = self.shared_path(rel) if shared else self.path(rel)
        return _retry(lambda: self.fs.exists(f"{dest}/_COMPLETE"), dest)

    def local_dir(self, rel: str, shared: bool = False) -> str:
        """A local path holding the directory: itself on a local store, a cached copy otherwise."""
        src = self.shared_path(rel) if shared else self.path(rel)
        if self.is_local:
            return src
        cache = Path(os.environ.get("M3PO_CACHE", Path(tempfile.gettempdir()) / "m3po-cache"))
        local = cache / hashlib.sha256(self.fs.unstrip_protocol(src).encode()).hexdigest()[:16]
        token = _retry(lambda: self.fs.cat_file(f"{src}/_COMPLETE"), src)

        def current() -> bool:
            try:
                return (local / "_COMPLETE").read_bytes() == token
            except OSError:
                return False

        if current():
            return str(local)
        # Several processes (shard flow runs on one machine) may fetch the same directory at once:
        # each downloads aside, then moves its copy in with a rename, which fails while another copy
        # is there; a copy of this version there is as good, a stale one is moved aside first.
        tmp = Path(f"{local}.tmp-{uuid.uuid4().hex}")
        _retry(lambda: self.fs.get(src + "/", str(tmp), recursive=True), src)
        for _ in range(5):
            try:
                os.rename(tmp, local)
                return str(local)
            except OSError:
                if current():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return str(local)
                stale = Path(f"{local}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(local, stale)
                except OSError:
                    pass  # gone already, or being replaced by another process: try again
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not place {src} in the local cache {local}")


class CellStore(RunStore):
    """One cell of an experiment grid (`{run}/cells/{cell_id}/`): its own pairs, adapter, metrics and
    predictions; the run's shared stages (prompts, candidates, scores, images, benchmarks and the
    base model's evaluation) are read from and cached in the run itself, so every cell reuses them."""

    SHARED = ("prompts/", "candidates/", "scores/", "images/", "eval/")

    def __init__(self, run: RunStore, cell_id: str):
        super().__init__(run.root, run.run_id)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cell_id or ""):
            raise ValueError(f"cell id {cell_id!r} must be a name of letters, digits, '.', '_' and '-'")
        self.run, self.cell_id = run, cell_id
        self.base = f"{run.base}/cells/{cell_id}"

    def path(self, rel: str) -> str:
        if rel.startswith(self.SHARED):
            return self.run.path(rel)
        return super().path(rel)


def round_stage(kind: str, r: int) -> str:
    """`rounds/candidates-r00`, `rounds/scores-r03`, ...: adaptive round r's stage in the store."""
    return f"rounds/{kind}-r{r:02d}"


def open_url(url: str, mode: str = "rb"):
    """Open any fsspec URL (image files referenced by the prompts table)."""
    return fsspec.open(url, mode)
