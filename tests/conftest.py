import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_vlm():
    """An untrained tiny LLaVA with the synthetic world's vocabulary (seconds to build)."""
    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tiny_llava

    return build_tiny_llava(world.vocabulary(), seed=0)


@pytest.fixture(scope="session")
def world_batch():
    from m3po_core.data import synthetic as world

    scenes = world.make_scenes(0, "train", 6)
    prompts = world.make_prompts(scenes, 0, per_scene=1)
    images = {s.scene_id: world.render(s, 64) for s in scenes}
    return [images[p["scene_id"]] for p in prompts], [p["instruction"] for p in prompts]


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """A throwaway Prefect API (temporary database) for the session, stopped before pytest exits."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
