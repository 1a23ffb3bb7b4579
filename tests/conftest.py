import os
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from the test server
# The CLI runs the tests start (subprocesses, ephemeral API) keep their Prefect database out of the
# user's ~/.prefect: one written by another Prefect release there would not open.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="m3po-tests-prefect-"))


@pytest.fixture(scope="session")
def tiny_vlm():
    """An untrained tiny LLaVA with the synthetic world's vocabulary (seconds to build)."""
    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tiny_llava

    return build_tiny_llava(world.vocabulary(), seed=0)


@pytest.fixture(scope="session")
def world_batch():
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    scenes = world.make_scenes(0, "train", 6)
    prompts = synthetic_prompts.make_prompts(scenes, 0, per_scene=1)
    images = {s.scene_id: world.render(s, 64) for s in scenes}
    return [images[p["scene_id"]] for p in prompts], [p["instruction"] for p in prompts]


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """A throwaway Prefect API (temporary database) for the session, stopped before pytest exits."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto's server mode, as s3fs's own tests use) with a
    bucket `m3po`; AWS_* variables point botocore (and so s3fs) at it for the session."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-SECRET-do-not-log",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="m3po")
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mined_run(tmp_path_factory):
    """One finished tiny run, 80 prompts with N = 32 candidates each (the viewer's and the exports' tests
    share it; about a minute): (root, run id). Beside it, run "broken": one image unreadable, so
    its candidates shard 1 failed, naming the image."""
    from pathlib import Path

    from m3po.flows.pipeline import m3po_pipeline
    from m3po_core.config import load_config
    from m3po_core.errors import M3POError
    from m3po_core.stages import prompts
    from m3po_core.store import RunStore

    root = str(tmp_path_factory.mktemp("mined"))
    cfg = load_config(Path(__file__).parent / "tiny.yaml", ["sampling.n=32", "data.world.n_train_scenes=40"])
    m3po_pipeline(config=cfg.to_dict(), root=root, run_id="mined")
    broken = RunStore(root, "broken")
    prompts.prepare_prompts(cfg, broken)
    Path(prompts.read_prompts_shard(broken, 1)[0]["image"]).write_bytes(b"not a png")
    with pytest.raises(M3POError):
        m3po_pipeline(config=cfg.to_dict(), root=root, run_id="broken")
    return root, "mined"
