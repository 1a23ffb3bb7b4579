"""What the viewer reads from a run's store: its configuration (secrets out), its sharded stages, a
prompt's pool of candidates (or IPA's responses, by round), and the benchmark questions on which the
base and the trained model disagree. Plain functions over a `RunStore`; nothing here writes.

Memory: a pool reads the one candidates and scores shard that holds the prompt; a benchmark's
predictions are read whole (thousands of rows). Limit: IPA rounds are read up to MAX_ROUNDS.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.compute as pc

from m3po_core.evaluation.yesno import parse_yes_no
from m3po_core.store import COMPLETE, RunStore

MAX_ROUNDS = 100
SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|token|credential|auth)", re.I)
YES_NO = ("pope", "mme")  # benchmarks whose answers are read as yes / no


def redacted(value: Any, key: str = "") -> Any:
    """A configuration with what could be a secret out: a field named like a key or password (not
    the name of the variable that holds one, `*_env`), and the user and password of any URL."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if isinstance(value, str):
        if SECRET_KEY.search(key) and not key.endswith("_env") and value:
            return "(hidden)"
        return without_userinfo(value)
    return value


def without_userinfo(text: str) -> str:
    """`s3://user:secret@host/x` -> `s3://host/x`; other text unchanged."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.username is None and parts.password is None:
        return text
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, parts.query,
                       parts.fragment))


def method(store: RunStore) -> str:
    return store.read_json("method.json")["method"] if store.exists("method.json") else "m3po"


def sharded_stages(store: RunStore) -> list[tuple[str, int]]:
    """(stage, number of shards) of every sharded stage the run has started: candidates and scores,
    or IPA's responses of each round (the rounds are consecutive; the first missing ends them)."""
    if not store.exists("prompts/_stage.json"):
        return []
    if method(store) == "ipa":
        stages = []
        for r in range(1, MAX_ROUNDS):
            if not store.exists(f"ipa/round-{r}/prompts/_stage.json"):
                break
            stages.append((f"ipa/round-{r}/responses", store.read_json(f"ipa/round-{r}/prompts/_stage.json")["n_shards"]))
        return stages
    n = store.read_json("prompts/_stage.json")["n_shards"]
    return [("candidates", n), ("scores", n)]


def round_stages(store: RunStore) -> list[str]:
    """An adaptive run's round stages, by round: rounds/candidates-r00, rounds/scores-r00, ..."""
    cands, scores = store.round_stages("candidates"), store.round_stages("scores")
    return sorted(cands + scores, key=lambda s: (s.rsplit("-r", 1)[-1], s.startswith("rounds/scores")))


def round_entries(store: RunStore, stage: str, done: set[int]) -> dict[int, dict[str, Any]]:
    """The records of the shards that reached this round. A shard whose candidates are published
    has finished all its rounds, so its round records stand complete unread (an adaptive run's
    status costs one listing per round, plus a read per shard still in its rounds)."""
    listed = store.manifest_versions(stage)
    entries = {s: {"shard": s, "state": COMPLETE} for s in listed if s in done}
    entries.update(store.shard_entries(stage, [s for s in listed if s not in done]))
    return entries


def stage_records(store: RunStore) -> list[tuple[str, int, dict[int, dict[str, Any]], bool]]:
    """(stage, shards, records by shard, is an adaptive round) of every sharded stage, then of an
    adaptive run's rounds (their shards: those that reached the round): what `m3po status` and
    the viewer's run page show. Each manifest is read once."""
    out, published = [], set()
    for stage, n in sharded_stages(store):
        entries = {e["shard"]: e for e in store.manifest(stage)}
        if stage == "candidates":
            published = {s for s, e in entries.items() if e.get("state") == COMPLETE}
        out.append((stage, n, entries, False))
    for stage in round_stages(store):
        entries = round_entries(store, stage, published)
        out.append((stage, len(entries), entries, True))
    return out


def stage_summary(stage: str, n: int, entries: dict[int, dict[str, Any]], round_of: bool = False) -> dict[str, Any]:
    """A stage's shards by state, from its records by shard: counts, each failed shard with its
    error, each complete shard with unrated candidates, and the running and missing shards.
    `round_of`: an adaptive round's (`round_entries`), whose shards are those of `entries`."""
    states = {i: entries.get(i, {}).get("state", "missing") for i in (sorted(entries) if round_of else range(n))}
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return {"stage": stage, "n": n, "counts": counts, "round": round_of,
            "failed": [(i, str(entries[i].get("error"))) for i, s in states.items() if s == "failed"],
            "unrated": [(i, entries[i]["unrated"]) for i, s in states.items() if s == COMPLETE and entries[i].get("unrated")],
            "running": [i for i, s in states.items() if s == "running"],
            "missing": [i for i, s in states.items() if s == "missing"]}


def pool(store: RunStore, prompt_id: str, shard: int, pair: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every candidate of one prompt with its scores, in cand_idx order, `role` "chosen",
    "rejected" or "" from its pair."""
    from m3po_core.stages.select import shard_candidates_with_scores

    table = shard_candidates_with_scores(store, shard, columns=["text", "logp_sum", "logp_mean", "n_tokens",
                                                                "finish_reason", "perturbation"])
    rows = table.filter(pc.equal(table.column("prompt_id"), prompt_id)).to_pylist()
    roles = {} if pair is None else {pair["chosen_idx"]: "chosen", pair["rejected_idx"]: "rejected"}
    for r in rows:
        r["role"] = roles.get(r["cand_idx"], "")
    return rows


def ipa_responses(store: RunStore, prompt_id: str) -> list[dict[str, Any]]:
    """IPA: the prompt's responses of every round it was in, each with its round, its four
    verification conditions, its feedback and what it revised."""
    from m3po_core.pair_query import read_prompt_index

    out = []
    for stage, _ in sharded_stages(store):
        round_dir = stage.rsplit("/", 1)[0]
        index = read_prompt_index(store, f"{round_dir}/prompts")
        found = index.filter(pc.equal(index.column("prompt_id"), prompt_id))
        if not found.num_rows:
            continue
        shard = found.column("shard")[0].as_py()
        if (store.shard_entry(stage, shard) or {}).get("state") != COMPLETE:
            continue
        table = store.read_shard(stage, shard)
        rows = table.filter(pc.equal(table.column("prompt_id"), prompt_id)).drop_columns(["token_ids"]).to_pylist()
        out += [{"round": int(round_dir.rsplit("-", 1)[1]), **r} for r in rows]
    return out


def benchmarks(store: RunStore) -> list[str]:
    """The benchmarks with predictions of both the base and the trained model."""
    found = []
    for stage in sorted({p.rsplit("/", 1)[-1] for p in store.fs.glob(store.path("predictions/predictions-trained-*"))}):
        bench = stage.removeprefix("predictions-trained-")
        if store.exists(f"eval/predictions-base-{bench}/_manifest"):
            found.append(bench)
    return found


def disagreements(store: RunStore, bench: str) -> tuple[int, list[dict[str, Any]]]:
    """(questions answered by both, those whose answers differ): a yes / no benchmark compares the
    answers as read (yes, no or neither), any other the texts. Each row: the question, its reference
    answer, its image and both models' predictions."""
    base = {(r["question_id"], r["row_id"]): r for r in store.read_stage(f"eval/predictions-base-{bench}").to_pylist()}
    trained = store.read_stage(f"predictions/predictions-trained-{bench}").to_pylist()
    images = benchmark_images(store, bench)
    both, differ = 0, []
    for t in trained:
        b = base.get((t["question_id"], t["row_id"]))
        if b is None:
            continue
        both += 1
        if bench in YES_NO:
            a, c = parse_yes_no(b["prediction"] or ""), parse_yes_no(t["prediction"] or "")
        else:
            a, c = (b["prediction"] or "").strip(), (t["prediction"] or "").strip()
        if a != c:
            differ.append({**{k: t[k] for k in ("question_id", "row_id", "category", "instruction", "answer")},
                           "base": b["prediction"], "trained": t["prediction"],
                           "has_image": t["row_id"] in images})
    return both, differ


def benchmark_images(store: RunStore, bench: str) -> dict[str, str]:
    """row_id -> image URL of a benchmark's questions as the run stored them: the public release's
    import (eval/public-{bench}.parquet, its images under eval/images/) or the world's held-out set."""
    rel = next((r for r in (f"eval/public-{bench}.parquet", f"eval/{bench}.parquet") if store.exists(r)), None)
    if rel is None:
        return {}
    t = store.read_table(rel)
    if "image" not in t.column_names or "row_id" not in t.column_names:
        return {}
    return dict(zip(t.column("row_id").to_pylist(), t.column("image").to_pylist()))
