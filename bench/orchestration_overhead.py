"""Orchestration overhead of the shard fan-out on the embedded default (ephemeral Prefect API).

    python bench/orchestration_overhead.py [--config tests/tiny.yaml] [--set key=value ...]

Runs the pipeline once in a fresh store, then reads every sampling/scoring task run back from the
Prefect API and the shard's own timings from the manifest:
  per-shard overhead = task-run wall time - (compute + waiting for the device)   (median)
  pipeline ratio     = pipeline wall time / sum of its tasks' compute (a shard task counts its
                       compute from the manifest, any other task its task-run wall time)
Prints measured figures against the targets (< 0.5 s per shard, < 1.10); asserts nothing.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "tests" / "tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterName

    from m3po.flows.pipeline import m3po_pipeline
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    cfg = load_config(args.config, args.overrides)
    root = tempfile.mkdtemp(prefix="m3po-overhead-")
    # models first, so the measured run is the DAG, not the one-off warm start and CLIP training
    m3po_pipeline(config=cfg.to_dict(), root=root, run_id="warmup")
    t0 = time.time()
    state = m3po_pipeline(config=cfg.to_dict(), root=root, run_id="measured", return_state=True)
    wall = time.time() - t0
    store = RunStore(root, "measured")
    info = store.read_json("report_info.json")
    overheads, compute = [], 0.0
    with get_client(sync_client=True) as client:
        parent = state.state_details.flow_run_id
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        for stage, task_name in (("candidates", "sample-shard"), ("scores", "score-shard")):
            entries = {e["shard"]: e for e in store.manifest(stage)}
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_name)),
                                         flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in subflows]}))
            for run in runs:
                shard = int(run.name.rsplit("-", 1)[1])
                task_wall = (run.end_time - run.start_time).total_seconds()
                overheads.append(task_wall - entries[shard]["wall_seconds"])
                compute += entries[shard]["seconds"]
        others = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in subflows]}))
        compute += sum((r.end_time - r.start_time).total_seconds() for r in others
                       if r.end_time and not r.name.startswith(("sample-shard", "score-shard")))
    median = statistics.median(overheads)
    print(f"shards measured: {len(overheads)}")
    print(f"per-shard orchestration overhead (median): {median:.3f} s   target < 0.5 s   ratio {median / 0.5:.2f}")
    print(f"pipeline wall / sum of task compute:      {wall / compute:.3f}     target < 1.10")
    print(f"pipeline wall time: {wall:.1f} s; stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in info['timings'].items()))


if __name__ == "__main__":
    main()
