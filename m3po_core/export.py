"""`m3po export`: a run's mined pairs, with their images, in the formats other trainers read.

    trl           Parquet files `data/train-NNNNN-of-NNNNN.parquet` in TRL's conversational vision
                  preference format: `images` (a list of one image, its bytes embedded), `prompt` (the
                  user turn: an image and the instruction), `chosen` and `rejected` (one assistant turn
                  each); `datasets.load_dataset("parquet", data_dir=OUT/"data")` reads it, TRL's
                  `DPOTrainer` trains on it with the model's processor.
    hf-dataset    the same rows as a `datasets` folder: `datasets.load_from_disk(OUT)`.
    llamafactory  LLaMA-Factory's multimodal preference data: `m3po_pairs.json` (sharegpt:
                  `conversations` with `<image>` in the human turn, `chosen`, `rejected`, `images`)
                  and its `dataset_info.json` entry (`ranking: true`); the images copied under
                  `images/`, referenced relative to OUT (LLaMA-Factory's `dataset_dir`/`media_dir`).

Every row also carries the pair's provenance: prompt_id, strategy, the chosen and rejected
candidate indices, their MAS and log P, the M3P-Score. `PairFilter` picks rows (the viewer's filter).

Streaming: pairs are read a batch at a time (`PairIndex.rows`), images copied as their original
bytes (never decoded or re-encoded); the `datasets` formats go through `Dataset.from_generator`,
which writes Arrow as it goes. Nothing half-written: the export is built in a folder beside OUT and
renamed into place when whole; an OUT that exists and is not empty is refused.
Limit: OUT is a local directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from m3po_core.errors import ArgumentError, InputError
from m3po_core.pair_query import PairFilter, PairIndex

if TYPE_CHECKING:
    from m3po_core.store import RunStore

FORMATS = ("trl", "hf-dataset", "llamafactory")
DATASET_NAME = "m3po_pairs"
ROWS_PER_FILE = 1000  # trl: rows per Parquet file (a file of 1,000 COCO images is ~150 MB)
BATCH = 256           # pairs read per batch
PROVENANCE = ["prompt_id", "strategy", "chosen_idx", "rejected_idx", "mas_chosen", "mas_rejected",
              "logp_chosen", "logp_rejected", "m3p_score"]


def export_pairs(store: "RunStore", fmt: str, out: str | Path, flt: PairFilter | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the pairs that pass `flt` to `out` in `fmt`; returns {"format", "out", "rows", "images"}.
    `on_progress(done, total)` after each batch."""
    if fmt not in FORMATS:
        raise ArgumentError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArgumentError(f"--out {out}: exists and is not an empty directory; choose another or remove it")
    index = PairIndex.build(store)
    rows = sorted(index.select(flt).column("row").to_pylist())  # file order: each row group read once
    if not rows:
        raise InputError(f"{store.url('pairs.parquet')}: no pair passes the filter {flt.as_params() if flt else {}}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        pairs = _pairs(index, rows, on_progress)
        if fmt == "llamafactory":
            images = _llamafactory(pairs, work)
        else:
            images = _hf(pairs, work, fmt)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"format": fmt, "out": str(out), "rows": len(rows), "images": images}


def _pairs(index: PairIndex, rows: list[int], on_progress) -> Iterator[dict[str, Any]]:
    """Full pair rows, each with `image_sha256`: its image's digest when the prompts were made."""
    for start in range(0, len(rows), BATCH):
        for pair in index.rows(rows[start:start + BATCH]):
            yield {**pair, "image_sha256": (index.prompt(pair["prompt_id"]) or {}).get("image_sha256")}
        if on_progress:
            on_progress(min(start + BATCH, len(rows)), len(rows))


def image_bytes(pair: dict[str, Any]) -> bytes:
    """A pair's image file's bytes as stored (no re-encoding), named on failure; refused when they
    are not the bytes the prompts stage read (the pair was mined on another image)."""
    from m3po_core.store import open_url

    url, prompt_id = pair["image"], pair["prompt_id"]
    try:
        with open_url(url) as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{url}: the image of prompt_id {prompt_id!r} cannot be read ({e})") from e
    if pair.get("image_sha256") and hashlib.sha256(data).hexdigest() != pair["image_sha256"]:
        raise InputError(f"{url}: the image of prompt_id {prompt_id!r} changed after the prompts stage read it; "
                         "not exported (a re-run of the pipeline mines its pair again)")
    return data


# -- TRL / datasets --------------------------------------------------------------------------------

def conversational(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair's prompt, chosen and rejected turns as TRL's conversational vision preference rows."""
    return {"prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                     {"type": "text", "text": pair["instruction"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}]}


def _features():
    from datasets import Features, Image, List, Value

    turn = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    return Features({"images": List(Image()), "prompt": turn, "chosen": turn, "rejected": turn,
                     "prompt_id": Value("string"), "strategy": Value("string"), "chosen_idx": Value("int32"),
                     "rejected_idx": Value("int32"), "mas_chosen": Value("float64"), "mas_rejected": Value("float64"),
                     "logp_chosen": Value("float64"), "logp_rejected": Value("float64"),
                     "m3p_score": Value("float64")})


def _hf(pairs: Iterator[dict[str, Any]], work: Path, fmt: str) -> int:
    from datasets import Dataset

    def rows() -> Iterator[dict[str, Any]]:
        for p in pairs:
            name = p["image"].rsplit("/", 1)[-1]
            yield {"images": [{"bytes": image_bytes(p), "path": name}],
                   **conversational(p), **{k: p[k] for k in PROVENANCE}}

    cache = work.with_name(work.name + "-cache")  # from_generator's Arrow, beside the export
    try:
        return _write_hf(Dataset.from_generator(rows, features=_features(), cache_dir=str(cache),
                                                 fingerprint=uuid.uuid4().hex), work, fmt)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _write_hf(ds, work: Path, fmt: str) -> int:
    if fmt == "hf-dataset":
        ds.save_to_disk(str(work))
    else:
        n_files = max(1, -(-len(ds) // ROWS_PER_FILE))
        (work / "data").mkdir()
        for i in range(n_files):
            part = ds.select(range(i * ROWS_PER_FILE, min(len(ds), (i + 1) * ROWS_PER_FILE)))
            part.to_parquet(str(work / "data" / f"train-{i:05d}-of-{n_files:05d}.parquet"))
    return len(ds)


# -- LLaMA-Factory ---------------------------------------------------------------------------------

def llamafactory_row(pair: dict[str, Any], image: str) -> dict[str, Any]:
    """One pair in LLaMA-Factory's sharegpt preference format (multimodal: `<image>` marks where
    the image goes in the human turn; `images` lists it, relative to the dataset folder)."""
    return {"conversations": [{"from": "human", "value": "<image>" + pair["instruction"]}],
            "chosen": {"from": "gpt", "value": pair["chosen"]},
            "rejected": {"from": "gpt", "value": pair["rejected"]},
            "images": [image], **{k: pair[k] for k in PROVENANCE}}


def llamafactory_info(file_name: str = f"{DATASET_NAME}.json") -> dict[str, Any]:
    """The dataset_info.json entry that registers the export with LLaMA-Factory."""
    return {DATASET_NAME: {"file_name": file_name, "formatting": "sharegpt", "ranking": True,
                           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                       "images": "images"},
                           "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                    "assistant_tag": "gpt"}}}


def _llamafactory(pairs: Iterator[dict[str, Any]], work: Path) -> int:
    (work / "images").mkdir()
    copied: dict[str, str] = {}  # image URL -> its path in the export (prompts may share an image)
    with open(work / f"{DATASET_NAME}.json", "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, p in enumerate(pairs):
            rel = copied.get(p["image"])
            if rel is None:
                suffix = Path(p["image"].rsplit("/", 1)[-1]).suffix.lower() or ".png"
                rel = f"images/{hashlib.sha256(p['image'].encode()).hexdigest()[:20]}{suffix}"
                (work / rel).write_bytes(image_bytes(p))
                copied[p["image"]] = rel
            f.write((",\n" if i else "") + json.dumps(llamafactory_row(p, rel), ensure_ascii=False))
        f.write("\n]\n")
    (work / "dataset_info.json").write_text(json.dumps(llamafactory_info(), indent=2) + "\n")
    return len(copied)
