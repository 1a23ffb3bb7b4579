"""The public POPE and MME releases (and IFT question files) as evaluation sets of a run.

Both are read from their Parquet layout (the one lmms-eval and VLMEvalKit load: columns
`question_id`, `question`, `answer`, `image`, `category`), local or on any fsspec URL, one file,
a directory of files or a glob:

    POPE   category in {random, popular, adversarial}; answer yes/no; 3 x 3000 questions
    MME    question_id = the image's name (its two questions share it); category = one of the ten
           perception and four cognition subtasks; answer Yes/No

`image` is either the Hugging Face image struct (`{bytes, path}`) or a path relative to the
Parquet file. Each distinct image is written once into the run's store (`eval/images/`), named by
its content hash, and the questions become `eval/{bench}.parquet` with the columns the evaluation
reads. The prompt is built as lmms-eval builds it for LLaVA-1.5: the stripped question plus
`evaluation.answer_suffix` ("\nAnswer the question using a single word or phrase."); for MME, when a
suffix is set, the release's own " Please answer yes or no." is removed first.

IFT files (m3po_core/evaluation/ift.py; `m3po make-ift` writes them) have the same layout plus a
`constraints` column; their `answer` is an optional reference, and no suffix is appended (the
question states its own constraints).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from m3po_core.errors import InputError

REQUIRED = ("question_id", "question", "answer", "image", "category")
REQUIRED_IFT = ("question_id", "question", "image", "constraints")
MME_OWN_SUFFIX = " Please answer yes or no."


def parquet_files(source: str) -> tuple[Any, list[str]]:
    """The file system and the Parquet files a path, directory or glob names (sorted)."""
    fs, path = url_to_fs(source)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{source}: no such benchmark file or directory")
    if not files:
        raise InputError(f"{source}: no Parquet files found")
    return fs, files


def source_fingerprint(source: str) -> list[tuple[str, int, str]]:
    """Each file's name, size and version (ETag on object stores, mtime on disks): part of the cache
    keys, so a release replaced in place is noticed."""
    fs, files = parquet_files(source)
    out = []
    for f in files:
        info = fs.info(f)
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        out.append((f, int(info.get("size") or 0), str(version)))
    return out


def load_public_benchmark(source: str, bench: str, answer_suffix: str,
                          put_image) -> list[dict[str, Any]]:
    """Question records of a public release; `put_image(name, data) -> url` stores an image."""
    fs, files = parquet_files(source)
    records: list[dict[str, Any]] = []
    stored: dict[str, str] = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            table = pq.read_table(fh)
        missing = [c for c in (REQUIRED_IFT if bench == "ift" else REQUIRED) if c not in table.column_names]
        if missing:
            raise InputError(f"{f}: {bench} file lacks columns {missing} (has {table.column_names})")
        for i, row in enumerate(table.to_pylist()):
            where = f"{f} row {i} (question_id {row.get('question_id')!r})"
            if bench == "ift":
                from m3po_core.evaluation.ift import parse_constraints

                constraints = json.dumps(parse_constraints(row["constraints"], where))
                row = {**row, "category": row.get("category") or "ift", "answer": row.get("answer") or ""}
            for c in ("question", "category") + (("answer",) if bench != "ift" else ()):
                if not isinstance(row[c], str) or not row[c].strip():
                    raise InputError(f"{where}: empty or missing {c!r}")
            if bench != "ift" and row["answer"].strip().lower() not in ("yes", "no"):
                raise InputError(f"{where}: answer {row['answer']!r} is not yes/no")
            data = _image_bytes(fs, f, row["image"], where)
            digest = hashlib.sha256(data).hexdigest()[:20]
            if digest not in stored:
                stored[digest] = put_image(f"{bench}-{digest}{_suffix(data)}", data)
            question = row["question"].strip()
            if bench == "mme" and answer_suffix:  # as lmms-eval: the suffix replaces the release's own
                question = question.replace(MME_OWN_SUFFIX, "")
            record = {"question_id": str(row["question_id"]), "row_id": f"{bench}-{len(records)}",
                      "category": row["category"], "image": stored[digest]}
            if bench == "ift":
                record.update(instruction=question, answer=row["answer"].strip(), constraints=constraints)
            else:
                record.update(instruction=question + answer_suffix, answer=row["answer"].strip().lower())
            records.append(record)
    return records


def _image_bytes(fs, parquet_path: str, image: Any, where: str) -> bytes:
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        image = image.get("path")
    if isinstance(image, str) and image:
        path = image if "://" in image or image.startswith("/") else posixpath.join(posixpath.dirname(parquet_path), image)
        if "://" in path:  # an image on another file system than the Parquet file
            fs, path = url_to_fs(path)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise InputError(f"{where}: image file {path} not found") from None
    raise InputError(f"{where}: no image (neither bytes nor a path)")


def _suffix(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".img"


def to_table(records: list[dict[str, Any]]) -> pa.Table:
    cols = ("question_id", "row_id", "category", "instruction", "answer", "image", "constraints")
    return pa.Table.from_pylist([{c: r[c] for c in cols if c in r} for r in records])
