"""DAG step 6, train: LoRA-DPO on pairs.parquet through TRL (m3po_core/training.py), in this
process or over `training.num_processes` processes (m3po_core/distributed.py).

    adapter/ (the LoRA adapter), train_log.json (its key, seconds, TRL's log history, the batch
    split (per_device_batch_size x num_processes x gradient_accumulation_steps), the length limit
    trained under, the pairs left out as longer than it (dropped_overlong_pairs), whether gradient
    checkpointing was on, and what `auto` decided from: memory)

Limit: any vLLM engine of this process is shut down first; it comes back when evaluation needs it.
"""
from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Callable

from m3po_core.components import release_engines
from m3po_core.config import RunConfig
from m3po_core.stages.runner import device_slot, done_record, stage_key
from m3po_core.store import RunStore

log = logging.getLogger("m3po.stages")


def train(cfg: RunConfig, store: RunStore, model_ref: str, log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """LoRA-DPO on pairs.parquet; the adapter lands in `adapter/`, the log in `train_log.json`.
    In this process, or over `training.num_processes` processes through `accelerate launch`."""
    pairs_sha = store.read_json("pairs_stats.json")["sha256"]
    key = stage_key(cfg, "train", pairs_sha, model_ref)
    if (record := done_record(store, "train_log.json", key)) is not None and store.dir_complete("adapter"):
        return record
    release_engines()  # also before `accelerate launch`: its ranks need the GPU this process's engine holds
    t0 = time.time()
    with device_slot(), tempfile.TemporaryDirectory() as tmp:
        if cfg.training.num_processes > 1:
            from m3po_core.distributed import launch_training

            trained = launch_training(cfg, store, model_ref, tmp, log_fn=log_fn)
        else:
            from m3po_core.training import train_adapter

            trained = train_adapter(cfg, store, model_ref, tmp, log_fn=log_fn)
        store.put_dir(tmp, "adapter")
    result = {"key": key, "pairs": store.read_json("pairs_stats.json")["pairs"], "seconds": time.time() - t0,
              "history": trained["history"], "num_processes": cfg.training.num_processes,
              # the split trained with (`auto` resolved on the device; rank 0's under several processes)
              "per_device_batch_size": trained["per_device_batch_size"],
              "gradient_accumulation_steps": trained["gradient_accumulation_steps"],
              "max_length": trained["max_length"], "dropped_overlong_pairs": trained["dropped_overlong_pairs"],
              "gradient_checkpointing": trained["gradient_checkpointing"], "memory": trained["memory"]}
    store.write_json("train_log.json", result)
    return result
