"""The judge budget (`scoring.max_judge_requests`, `scoring.max_judge_cost`) and the run's judge spend.

A run's spend is what its score records say the judge cost (`judge_usage` of every scores shard;
of every adaptive round whose shard has no scores record yet), read when a shard starts scoring
(one listing per stage; a record is read again only when the listing shows it changed), plus what
the judge has cost this process since. Scoring asks the judge in chunks of at most
`CHUNK` candidates and does not send a chunk the budget cannot pay (by the requests and cost per
candidate measured so far; a cost budget's first chunk is `PROBE` candidates): the candidates left
are unrated (no MAS, in no pair; never invented) and counted as `unrated_budget` in the shard's
record with the budget in force, so a run with a larger budget rates them and one with the same
budget sends nothing. The reference judge counts one request per rating, as an OpenAI judge with
one candidate per call sends.

Limit: shards scoring at the same time in different processes each see the records of the shards
finished when they started, so together they can pass the budget by what the others spend
meanwhile (at most one shard's spend per other process scoring).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from m3po_core.store import COMPLETE, RunStore

CHUNK = 64  # candidates per judge call under a budget: what one call can pass the budget by
PROBE = 8   # a cost budget's first call, before any cost per candidate is measured
SPENT = ("requests", "prompt_tokens", "completion_tokens", "cost")


# stage manifest/shard -> (its record's version in the listing, the record): a process re-reads only
# the records that changed since it last looked, so a shard's start costs one listing per stage, not
# a read of every record (at 3,000 shards, 3,000 reads per shard). ~1 KB per record the process saw.
_SEEN: dict[str, tuple[str, dict[str, Any]]] = {}


def complete_records(store: RunStore, stage: str) -> dict[int, dict[str, Any]]:
    """shard -> the stage's complete records, read only where the listing shows a new version."""
    versions = store.manifest_versions(stage)
    where = store.url(f"{stage}/_manifest")
    stale = [s for s, v in versions.items() if v is None or _SEEN.get(f"{where}/{s}", (None,))[0] != v]
    for shard, record in store.shard_entries(stage, stale).items():
        _SEEN[f"{where}/{shard}"] = (versions[shard], record)
    records = {s: _SEEN[f"{where}/{s}"][1] for s in sorted(versions) if f"{where}/{s}" in _SEEN}
    return {s: r for s, r in records.items() if r.get("state") == COMPLETE}


def run_spend(store: RunStore) -> dict[str, float]:
    """What the judge cost the run so far, from the score records (adaptive rounds included)."""
    total: dict[str, Any] = {k: 0.0 for k in SPENT} | {"unrated_budget": 0, "shards": 0}
    cost_known = True

    def add(record: dict[str, Any]) -> None:
        nonlocal cost_known
        usage = record.get("judge_usage") or {}
        for k in SPENT:
            v = usage.get(k)
            if isinstance(v, (int, float)):
                total[k] += v
            elif k == "cost" and usage:
                cost_known = False
        total["unrated_budget"] += record.get("unrated_budget", 0)

    scored = complete_records(store, "scores")
    for record in scored.values():
        total["shards"] += 1
        add(record)
    for stage in store.round_stages("scores"):
        for shard, record in complete_records(store, stage).items():
            if shard not in scored:
                add(record)
    if not cost_known:
        total["cost"] = None
    return total


def spend_line(store: RunStore, scoring) -> str | None:
    """`judge spend: 120 of 200 requests, cost 1.20 of 5.00; 40 candidates unrated at the budget ...`
    (`m3po status`, the report); None for a run without judge spend or budget."""
    spent = run_spend(store)
    limits = (scoring.max_judge_requests, scoring.max_judge_cost)
    if not spent["requests"] and limits == (None, None):
        return None
    requests = f"{int(spent['requests'])}" + (f" of {limits[0]}" if limits[0] is not None else "") + " requests"
    tokens = (f", {int(spent['prompt_tokens'])} + {int(spent['completion_tokens'])} tokens"
              if spent["prompt_tokens"] or spent["completion_tokens"] else "")
    cost = "" if spent["cost"] is None or (not spent["cost"] and limits[1] is None) else \
        f", cost {spent['cost']:.2f}" + (f" of {limits[1]:.2f}" if limits[1] is not None else "")
    left = (f"; {spent['unrated_budget']} candidates unrated at the budget (a run with a larger budget rates them)"
            if spent["unrated_budget"] else "")
    return f"judge spend: {requests}{tokens}{cost}{left}"


def projection(first: dict[str, Any], n_shards: int, scoring) -> str | None:
    """What the whole stage will cost the judge, from its first scored shard's record (`judge_usage`,
    rows): requests, tokens and cost times the shards, against the budget."""
    usage = first.get("judge_usage") or {}
    if not usage.get("requests") and not usage.get("cache_hits"):
        return None
    rated = max(first.get("rows", 0) - first.get("unrated_budget", 0), 1)
    scale = n_shards * first.get("rows", rated) / rated  # a shard cut short at the budget, scaled to whole
    parts = [f"~{usage.get('requests', 0) * scale:,.0f} requests"]
    if usage.get("prompt_tokens") or usage.get("completion_tokens"):
        parts.append(f"~{(usage.get('prompt_tokens', 0) + usage.get('completion_tokens', 0)) * scale:,.0f} tokens")
    if usage.get("cost") is not None:
        parts.append(f"cost ~{usage['cost'] * scale:,.2f}")
    budget = [f"{scoring.max_judge_requests} requests" if scoring.max_judge_requests is not None else "",
              f"cost {scoring.max_judge_cost:.2f}" if scoring.max_judge_cost is not None else ""]
    budget_text = " and ".join(b for b in budget if b)
    return (f"judge projection for {n_shards} shards (from shard {first.get('shard', 0)}'s measured usage): "
            + ", ".join(parts) + (f"; budget {budget_text}" if budget_text else "; no budget set"))


@dataclass
class JudgeBudget:
    max_requests: int | None
    max_cost: float | None
    spent: dict[str, Any] = field(default_factory=dict)   # the run's, when this shard started scoring
    unrated: int = 0                                      # candidates this shard left unrated at the budget

    @classmethod
    def for_run(cls, scoring, store: RunStore) -> "JudgeBudget | None":
        if scoring.max_judge_requests is None and scoring.max_judge_cost is None:
            return None
        return cls(scoring.max_judge_requests, scoring.max_judge_cost, run_spend(store))

    def limits(self) -> dict[str, Any]:
        return {"max_requests": self.max_requests, "max_cost": self.max_cost}

    def allowed(self, used: dict[str, Any], items_done: int) -> int:
        """Candidates the budget can still pay for, given what this shard's calls `used` for `items_done`."""
        left = []
        if self.max_requests is not None:
            spent = (self.spent.get("requests") or 0) + (used.get("requests") or 0)
            per_item = (used.get("requests") or 0) / items_done if items_done and used.get("requests") else 1.0
            left.append((self.max_requests - spent) / per_item if per_item > 0 else CHUNK)
        if self.max_cost is not None:
            spent = (self.spent.get("cost") or 0.0) + (used.get("cost") or 0.0)
            if not items_done:
                left.append(PROBE if spent < self.max_cost else 0)
            else:
                per_item = (used.get("cost") or 0.0) / items_done
                left.append((self.max_cost - spent) / per_item if per_item > 0 else CHUNK)
        return max(0, int(min(left))) if left else CHUNK


def usage_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {k: v - (before.get(k) or 0) for k, v in after.items() if isinstance(v, (int, float))}
    if after.get("cost") is not None:
        out["cost"] = after["cost"] - (before.get("cost") or 0.0)
    return out


def rate_within_budget(judge, items: Sequence[Any], budget: JudgeBudget | None) -> list[Any]:
    """`judge.score(items)`, in chunks the budget can pay for; the items past it are None."""
    if budget is None:
        return judge.score(items)
    start = dict(getattr(judge, "usage", {}))
    out: list[Any] = [None] * len(items)
    done = 0
    while done < len(items):
        used = usage_delta(dict(getattr(judge, "usage", {})), start)
        used.setdefault("requests", done)  # a judge that counts nothing: one request per rating
        take = min(budget.allowed(used, done), CHUNK, len(items) - done)
        if take <= 0:
            break
        out[done:done + take] = judge.score(items[done:done + take])
        done += take
    budget.unrated += len(items) - done
    return out


def budget_raised(record: dict[str, Any], scoring) -> bool:
    """A record with candidates left unrated at a budget smaller than the one in force now."""
    if not record.get("unrated_budget"):
        return False
    was = record.get("judge_budget") or {}
    for key, now in (("max_requests", scoring.max_judge_requests), ("max_cost", scoring.max_judge_cost)):
        before = was.get(key)
        if before is not None and (now is None or now > before):
            return True
    return False
