"""`m3po status RUN`: each sharded stage of a run and what is left, readable at thousands of shards.

Per stage, one line of counts by state (`candidates  3000 shards  complete=2990 failed=7 missing=3`),
then the failed shards grouped by their error (`shard 12: ...` or `shards 40-44 (5): ...`), the
complete shards with candidates the judge left unrated, grouped the same way, and the running and
missing shards as ranges; then an adaptive run's rounds (the shards that reached each; only the
records of shards still in their rounds are read), then the run's later steps. A stage's manifest
is read with one listing and concurrent reads of its records (RunStore.manifest), so an s3:// run of 3,000 shards per stage
is a few listings and a few hundred concurrent GETs, not 6,000 round trips one after the other.
Limit: MAX_GROUPS error groups and MAX_RANGES ranges per stage unless `--all`.
"""
from __future__ import annotations

import sys
from typing import Any

MAX_GROUPS = 20
MAX_RANGES = 30


def ranges(shards: list[int]) -> list[str]:
    """[1, 2, 3, 7] -> ["1-3", "7"]."""
    out: list[str] = []
    start = prev = None
    for s in sorted(shards):
        if prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = s
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return out


def _shards_text(shards: list[int], limit: int | None) -> str:
    parts = ranges(shards)
    if limit is not None and len(parts) > limit:
        return ", ".join(parts[:limit]) + f", ... ({len(parts) - limit} more ranges)"
    return ", ".join(parts)


def _groups(by_shard: dict[int, str], limit: int | None) -> list[str]:
    """One line per distinct message: `shard 3: msg` or `shards 3-5, 9 (4): msg`, largest group first."""
    groups: dict[str, list[int]] = {}
    for shard, msg in sorted(by_shard.items()):
        groups.setdefault(msg, []).append(shard)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    lines = [f"  shard {shards[0]}: {msg}" if len(shards) == 1 else
             f"  shards {_shards_text(shards, MAX_RANGES if limit else None)} ({len(shards)}): {msg}"
             for msg, shards in ordered[:limit]]
    if limit is not None and len(ordered) > limit:
        rest = sum(len(s) for _, s in ordered[limit:])
        lines.append(f"  ... {len(ordered) - limit} more groups ({rest} shards): --all lists every one")
    return lines


def stage_lines(stage: str, n: int, entries: dict[int, dict[str, Any]], show_all: bool = False,
                round_of: bool = False) -> list[str]:
    """What `m3po status` prints for one stage of `n` shards, from its manifest records by shard;
    `round_of`: an adaptive round's, whose shards are those of `entries` (the ones that reached it)."""
    from m3po_core.store import retry_unrated

    limit = None if show_all else MAX_GROUPS
    states = {i: entries.get(i, {}).get("state", "missing") for i in (sorted(entries) if round_of else range(n))}
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    what = "shards reached this round" if round_of else "shards"
    lines = [f"{stage:<11} {n} {what}  " + " ".join(f"{s}={c}" for s, c in counts.items())]
    lines += _groups({i: str(entries[i].get("error")) for i, s in states.items() if s == "failed"}, limit)
    unrated = {}
    for i, s in states.items():
        if s == "complete" and entries[i].get("unrated"):  # published; done once its attempts run out
            more = "re-run to retry" if retry_unrated(entries[i]) else f"kept after {entries[i].get('attempts', 1)} attempts"
            unrated[i] = f"complete, {entries[i]['unrated']} unrated: {more}"
        if s == "complete" and entries[i].get("last_retry"):  # kept as published; the retry's error
            unrated[i] = f"complete (kept as published); a retry failed: {entries[i]['last_retry'].get('error')}"
    lines += _groups(unrated, limit)
    for state in ("running", "missing"):
        shards = [i for i, s in states.items() if s == state]
        if shards:
            lines.append(f"  {state}: {_shards_text(shards, None if show_all else MAX_RANGES)}")
    return lines


def status(root: str, run_id: str, show_all: bool = False) -> int:
    from m3po_core.store import RunStore

    store = RunStore(root, run_id)
    if not store.exists("prompts/_stage.json"):
        print(f"m3po: no run {run_id!r} under {root}", file=sys.stderr)
        return 2
    from m3po_core.viewer.run_data import stage_records

    for stage, n, entries, round_of in stage_records(store):
        print("\n".join(stage_lines(stage, n, entries, show_all, round_of)))
    if store.exists("config.json"):
        from m3po_core.config import config_from_dict
        from m3po_core.scoring.budget import spend_line

        if line := spend_line(store, config_from_dict(store.read_json("config.json")).scoring):
            print(line)
    for name in ("pairs.parquet", "adapter/_COMPLETE", "metrics.json", "report.md"):
        print(f"{name:<20} {'done' if store.exists(name) else 'not yet'}")
    return 0
