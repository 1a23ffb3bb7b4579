"""The GPU work-pool base job templates (deployments/*-gpu.json), the deployments of
deployments/prefect.yaml and the GPU image's pins: static checks, no server, no network."""
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """Overrides conftest's session-wide Prefect test server: nothing here talks to an API."""
    yield


def _template(name: str) -> dict:
    template = json.loads((DEPLOYMENTS / name).read_text())
    assert set(template) == {"job_configuration", "variables"}
    assert template["variables"]["type"] == "object"
    return template


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


@pytest.mark.parametrize("name", ["docker-gpu.json", "kubernetes-gpu.json"])
def test_every_placeholder_is_a_declared_variable(name):
    template = _template(name)
    used = {m for s in _strings(template["job_configuration"]) for m in PLACEHOLDER.findall(s)}
    declared = set(template["variables"]["properties"])
    assert used, name
    assert used <= declared, f"{name}: undeclared {sorted(used - declared)}"
    assert template["variables"]["properties"]["image"]["default"] == "m3po-worker:latest"


def test_docker_template_requests_all_gpus_through_container_create_kwargs():
    template = _template("docker-gpu.json")
    assert template["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    default = template["variables"]["properties"]["container_create_kwargs"]["default"]
    # docker-py turns each dict into docker.types.DeviceRequest: `docker run --gpus all`
    assert default["device_requests"] == [{"count": -1, "capabilities": [["gpu"]]}]


def test_kubernetes_template_requests_and_limits_gpus_and_tolerates_gpu_taints():
    template = _template("kubernetes-gpu.json")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["image"] == "{{ image }}"
    gpus = template["variables"]["properties"]["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_deployment_entrypoints_are_flows_of_this_repository():
    from prefect import Flow

    spec = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file(), deployment["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, func, None), Flow), deployment["entrypoint"]
        assert deployment["work_pool"]["name"] == "m3po-gpu"
        names.add(f"{getattr(module, func).name}/{deployment['name']}")
    # what `execution.shards: deployment` runs (m3po_core.config.ExecutionConfig)
    from m3po_core.config import ExecutionConfig

    assert {ExecutionConfig.sample_deployment, ExecutionConfig.score_deployment, "m3po-pipeline/m3po-pipeline"} <= names


def test_gpu_image_pins_and_cuda_base():
    pins = dict(line.split("==") for line in (REPO / "docker/constraints-gpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.14.0" and pins["torchvision"] == "0.29.0" and pins["vllm"] == "0.33.0"
    assert pins["prefect"] == "3.7.7" and pins["prefect-docker"] == "0.7.3"
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    assert "-e '/opt/m3po[vllm]'" in dockerfile  # vLLM in the pipeline's own environment
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", dockerfile, re.M)
    assert base, "the image builds on an official CUDA runtime image"
    import torch

    if torch.version.cuda is None:
        pytest.skip("CPU-only torch here: its CUDA version cannot be compared with the image's")
    # the CUDA of the torch wheels here (the same release line as the image's pin)
    assert ".".join(base.groups()) == torch.version.cuda
