"""IPA's tasks: thin wrappers over m3po_core.stages.ipa_round (the store does the caching, as for M3PO)."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from m3po_core.config import RunConfig
from m3po_core.stages import ipa_round
from m3po_core.stages.runner import ShardResult
from m3po_core.store import RunStore


def _info(msg: str) -> None:
    get_run_logger().info(msg)


@task(name="ipa-generator", task_run_name="ipa-generator-round-{r}", cache_policy=NO_CACHE)
def generator(cfg: RunConfig, store: RunStore, model_ref: str, r: int) -> str | None:
    return ipa_round.generator(cfg, store, model_ref, r, log_fn=_info)


@task(name="ipa-round-prompts", task_run_name="ipa-prompts-round-{r}", cache_policy=NO_CACHE)
def prepare_round(cfg: RunConfig, store: RunStore, r: int, n_prompt_shards: int) -> int:
    return ipa_round.prepare_round(cfg, store, r, n_prompt_shards)


@task(name="ipa-shard", task_run_name="ipa-round-{r}-shard-{shard:05d}", cache_policy=NO_CACHE)
def ipa_shard(cfg: RunConfig, store: RunStore, shard: int, model_ref: str, r: int,
              generator_rel: str | None) -> ShardResult:
    result = ipa_round.ipa_shard(cfg, store, r, shard, model_ref, generator_rel)
    _info(f"IPA round {r} shard {shard}: {result.rows} responses "
          + ("(cached)" if result.cached else f"computed in {result.seconds:.1f}s"))
    return result


@task(name="ipa-collect-round", task_run_name="ipa-collect-round-{r}", cache_policy=NO_CACHE)
def collect_round(cfg: RunConfig, store: RunStore, r: int, n_shards: int, model_ref: str) -> dict[str, Any]:
    record = ipa_round.collect_round(cfg, store, r, n_shards, model_ref)
    _info(f"IPA round {r}: {record['pairs']} pairs from {record['prompts']} prompts; "
          f"{len(record['unresolved'])} unresolved carried on")
    return record


@task(name="ipa-pairs", cache_policy=NO_CACHE)
def finalize(cfg: RunConfig, store: RunStore, rounds_run: int) -> dict[str, Any]:
    return ipa_round.finalize(cfg, store, rounds_run)
