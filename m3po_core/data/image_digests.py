"""The SHA-256 of every prompt's image, read once per file version.

Each image file is identified by what its file system reports without reading it: size and
modification time (ns) on a local disk, ETag (or version id) and size on an object store, taken from
one listing per directory. A digest (and the quality filter's verdict: readable, undecodable,
oversized) is kept in ``prompts/_images.parquet`` under that identity, so a re-run reads only the
files that are new or changed: an image replaced in place by another decodable image gets a new
digest, the prompts shards holding it new content, and the stages below them new keys.

Limit: a file rewritten with the same bytes count and within the file system's mtime resolution
keeps its identity (on a local disk that resolution is nanoseconds; object stores always change the
ETag when the bytes change).
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import fsspec
import pyarrow as pa
from m3po_core.data.images import MAX_IMAGE_PIXELS, open_unchecked
from m3po_core.errors import InputError

log = logging.getLogger("m3po.images")
CACHE_SCHEMA = pa.schema([("url", pa.string()), ("identity", pa.string()), ("sha256", pa.string()),
                          ("verdict", pa.string())])
READABLE, MISSING, UNDECODABLE, TOO_LARGE = "ok", "missing", "undecodable", "too_large"


def identities(urls: Iterable[str]) -> dict[str, str]:
    """url -> its file identity ("" for a file that is not there), one listing per directory."""
    by_dir: dict[tuple[str, str], list[tuple[str, str]]] = {}
    fss: dict[str, fsspec.AbstractFileSystem] = {}
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        fss[proto] = fs
        by_dir.setdefault((proto, posixpath.dirname(path)), []).append((url, posixpath.basename(path)))
    out: dict[str, str] = {}
    for (proto, directory), members in by_dir.items():
        try:
            listing = {posixpath.basename(e["name"].rstrip("/")): e  # refresh: s3fs caches listings
                       for e in fss[proto].ls(directory, detail=True, refresh=True)}
        except FileNotFoundError:
            listing = {}
        for url, name in members:
            out[url] = _identity(listing[name]) if name in listing else ""
    return out


def store_version(entry: dict) -> str | None:
    """An object store's version of a file from its listing or info entry (version id, ETag, MD5,
    generation); None on a local disk."""
    for field in ("VersionId", "ETag", "etag", "md5Hash", "generation"):
        if entry.get(field):
            return f"{field}={str(entry[field]).strip(chr(34))}"
    return None


def _identity(entry: dict) -> str:
    if (version := store_version(entry)) is not None:
        return f"{version};size={entry.get('size')}"
    mtime = entry.get("mtime") or entry.get("LastModified") or entry.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    ns = entry.get("mtime_ns") or (int(float(mtime) * 1e9) if mtime is not None else None)
    return f"size={entry.get('size')};mtime_ns={ns};ino={entry.get('ino', '')}"


def read_digest(url: str, decode: bool) -> tuple[str | None, str]:
    """(sha256 of the bytes, verdict). With `decode`, Pillow decodes the pixels (a truncated JPEG is
    UNDECODABLE) after the size check (TOO_LARGE). A read failure other than a missing file
    (credentials, throttling) is raised, naming the image: dropping those prompts would cache a
    silently smaller data set."""
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, MISSING
    except Exception as e:
        raise InputError(f"{url}: cannot read the image ({type(e).__name__}: {e}); nothing was filtered") from e
    digest = hashlib.sha256(data).hexdigest()
    if decode:
        try:
            with open_unchecked(data) as img:
                if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                    return digest, TOO_LARGE
                img.load()
        except Exception:  # Pillow raises several types for corrupt or truncated data (bombs included)
            return digest, UNDECODABLE
    return digest, READABLE


def digests(urls: list[str], *, decode: bool, threads: int, cache: pa.Table | None
            ) -> tuple[dict[str, tuple[str | None, str]], pa.Table, int]:
    """url -> (sha256, verdict) for every url; the updated cache table; how many files were read.
    A cached verdict made without decoding is not reused when `decode` is asked for."""
    ident = identities(urls)
    known: dict[str, tuple[str, str | None, str]] = {}
    if cache is not None:
        for row in cache.to_pylist():
            known[row["url"]] = (row["identity"], row["sha256"], row["verdict"])
    out: dict[str, tuple[str | None, str]] = {}
    todo = []
    for url in urls:
        k = known.get(url)
        if ident[url] and k is not None and k[0] == ident[url] and (k[2] != "unchecked" or not decode):
            out[url] = (k[1], READABLE if k[2] == "unchecked" else k[2])
        elif not ident[url]:
            out[url] = (None, MISSING)
        else:
            todo.append(url)
    every = max(1000, len(todo) // 20)  # progress on long reads (150K images take minutes)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (url, result) in enumerate(zip(todo, pool.map(lambda u: read_digest(u, decode), todo)), start=1):
            out[url] = result
            if done % every == 0 and done < len(todo):
                log.info("images: read %d of %d new or changed files", done, len(todo))
    rows = [{"url": u, "identity": ident[u], "sha256": out[u][0],
             "verdict": out[u][1] if decode or out[u][1] != READABLE else "unchecked"}
            for u in sorted(out) if ident[u]]
    return out, pa.Table.from_pylist(rows, CACHE_SCHEMA), len(todo)
