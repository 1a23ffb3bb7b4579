"""Shards as tasks on Ray through prefect-ray's task runner, on a local Ray instance."""
from pathlib import Path
import os

import pytest

from m3po_core.config import load_config
from m3po_core.errors import M3POError
from m3po_core.store import RunStore

pytest.importorskip("prefect_ray")
TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.slow


def test_sampling_shards_run_as_ray_tasks_in_ray_workers(tmp_path):
    from m3po.flows.stage_flows import generate

    cfg = load_config(TINY, ["execution.shards=ray", "execution.ray_gpus_per_shard=0"])
    out = generate(cfg.to_dict(), str(tmp_path), "ray1")
    assert out["n_shards"] == 3 and out["computed"] == 3
    entries = RunStore(str(tmp_path), "ray1").manifest("candidates")
    assert [e["state"] for e in entries] == ["complete"] * 3
    assert all(e["pid"] != os.getpid() for e in entries)     # computed in Ray's worker processes
    assert sum(e["rows"] for e in entries) == 24 * cfg.sampling.n


def test_a_gpu_request_a_local_cpu_instance_cannot_meet_is_refused(tmp_path):
    import torch

    from m3po.flows.stage_flows import generate

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config(TINY, ["execution.shards=ray"])
    with pytest.raises(M3POError, match="execution.ray_gpus_per_shard"):
        generate(cfg.to_dict(), str(tmp_path), "ray2")
