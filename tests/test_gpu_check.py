"""bench/gpu_check.py --tiny: every step of the GPU check on the CPU (no figure asserted), and the bundle's closure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_toy_shapes(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    record = json.loads(out.read_text())
    steps = {s["step"]: s for s in record["steps"]}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["status"] for s in record["steps"]] == ["ok"] * len(record["steps"])
    assert list(steps) == ["env", "build", "sample_2x4", "sample_3x4", "sample_3x4_candidate_seeds", "train_config",
                           "train_auto", "handover", "adapter_check", "dag"]
    for name in ("sample_2x4", "sample_3x4", "sample_3x4_candidate_seeds"):
        r = steps[name]["result"]
        assert r["finite_logp"] == r["candidates"] and r["generated_tokens"] > 0 and r["floor_step_ms"] > 0
    assert steps["train_config"]["result"]["gradient_checkpointing"] is True
    assert (steps["train_auto"]["result"]["per_device_batch_size"], steps["train_auto"]["result"]["gradient_checkpointing"]) == (8, False)
    assert steps["adapter_check"]["result"]["zeroed_B_refused"] is True
    assert steps["adapter_check"]["result"]["trained_adapter_change"] > 1e-4
    assert steps["dag"]["result"]["report"] is True and steps["dag"]["result"]["pairs"] > 0
    assert "step_over_floor" in proc.stdout or "the floor" in proc.stdout    # the closing table


def test_the_full_shape_is_llava_1_5_7b():
    """The check's built model has the published parameter count (built on the meta device: no memory)."""
    import gpu_check

    model, processor = gpu_check.build_llava(gpu_check.SHAPES["full"], "meta")
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert len(processor.tokenizer) == 32064


def test_the_bundle_carries_what_the_target_lacks_with_the_extras_it_needs():
    import gpu_bundle

    needed = gpu_bundle.closure("m3po", {"torch", "pyarrow", "nvidia-*", "s3fs"}, "3.12.3")
    assert {"prefect", "trl", "open-clip-torch", "openai", "greenlet"} <= set(needed)  # greenlet: sqlalchemy[asyncio]
    assert not {"torch", "pyarrow", "s3fs"} & set(needed)
    assert not any(n.startswith("nvidia-") for n in needed)
