"""The train stage on many processes: `accelerate launch` runs this module once per GPU (DDP, or
DeepSpeed ZeRO with `training.deepspeed_zero`); every rank reads the pairs from the store, TRL
shards them, rank 0 saves the adapter and its training result (log history, length limit,
dropped pairs). Every rank checks the pairs' lengths alike, so all drop the same pairs, or all refuse.

    launch_training(cfg, store, model_ref, out)   what the train stage calls (a subprocess, waited on)
    python -m m3po_core.distributed JOB.json      what each rank runs (JOB: config, root, run id, ...)

On a machine without CUDA the ranks run on the CPU over gloo, which is how the tests check it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from m3po_core.child_processes import die_with_parent, exit_with_parent
from m3po_core.config import RunConfig, config_from_dict
from m3po_core.errors import M3POError
from m3po_core.store import CellStore, RunStore

HISTORY = "m3po_train_history.json"


def launch_command(cfg: RunConfig, job_file: str, cuda: bool) -> list[str]:
    t = cfg.training
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(t.num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if t.deepspeed_zero:
        if not cuda:
            raise M3POError("training.deepspeed_zero needs GPUs; without CUDA use plain DDP (deepspeed_zero: null)")
        cmd += ["--use_deepspeed", "--zero_stage", str(t.deepspeed_zero)]
    elif cuda:
        cmd += ["--multi_gpu"]
    else:
        cmd += ["--multi_gpu"]   # torchrun; without CUDA the ranks form a gloo group on the CPU
    return cmd + ["--module", "m3po_core.distributed", job_file]


def launch_training(cfg: RunConfig, store: RunStore, model_ref: str, output_dir: str,
                    log_fn: Callable[[str], None]) -> dict[str, Any]:
    """Run the ranks, relay their output line by line, fail with the tail of it if a rank fails.
    Returns rank 0's `train_adapter` result."""
    import torch

    job = Path(output_dir).parent / f"{Path(output_dir).name}-job.json"
    job.write_text(json.dumps({"config": cfg.to_dict(), "root": store.root, "run_id": store.run_id,
                               "cell_id": getattr(store, "cell_id", None),  # an experiment cell's own pairs
                               "model_ref": model_ref, "output_dir": output_dir}))
    cmd = launch_command(cfg, str(job), torch.cuda.is_available())
    log_fn(f"training on {cfg.training.num_processes} processes: {' '.join(cmd[1:])}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tail: list[str] = []
    try:
        # SIGTERM to the launcher if this process dies (its ranks die with the launcher, see _rank_main)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              preexec_fn=die_with_parent) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if line.startswith("[m3po]"):
                    log_fn(line[7:])
        if proc.returncode != 0:
            raise M3POError(f"distributed training failed (exit {proc.returncode}):\n" + "\n".join(tail))
    finally:
        job.unlink(missing_ok=True)
    history = Path(output_dir) / HISTORY
    out = json.loads(history.read_text())
    history.unlink()  # the adapter directory holds the adapter only
    return out


def _rank_main(job_file: str) -> None:
    import torch
    from accelerate import PartialState

    from m3po_core.training import train_adapter

    exit_with_parent()  # a rank whose launcher was killed stops instead of holding its GPU

    job = json.loads(Path(job_file).read_text())
    cfg = config_from_dict(job["config"])
    # without CUDA, say so before the trainer does: the ranks then form a gloo group on the CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)  # "cuda" is this rank's GPU when the model loads
    log = (lambda msg: print(f"[m3po] {msg}", flush=True)) if state.is_main_process else (lambda msg: None)
    store = RunStore(job["root"], job["run_id"])
    if job.get("cell_id"):
        store = CellStore(store, job["cell_id"])
    result = train_adapter(cfg, store, job["model_ref"], job["output_dir"], log_fn=log)
    if state.is_main_process:
        (Path(job["output_dir"]) / HISTORY).write_text(json.dumps(result))
    state.wait_for_everyone()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
