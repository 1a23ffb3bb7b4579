"""The guard against a LoRA adapter that changes nothing (m3po_core/evaluation/adapter_check.py): with
real PEFT adapters on the tiny LLaVA in process (transformers, through evaluation), and against the
OpenAI-protocol server on loopback. The vLLM side is in tests/test_vllm_backend.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from m3po_core import components
from m3po_core.config import load_config
from m3po_core.errors import AdapterNoOp, InputError
from m3po_core.evaluation.adapter_check import TOP_K, check_adapter_changes_model, max_logprob_change
from m3po_core.sampling.openai_backend import OpenAICompatibleSampler
from m3po_core.store import RunStore
from openai_server import FakeOpenAIServer, Reply
from openai_server import openai_server  # noqa: F401 (the fixture)

TINY = Path(__file__).parent / "tiny.yaml"


def test_the_change_is_measured_on_the_tokens_both_sides_report():
    base = [{1: -0.5, 2: -1.0}, {3: -0.1}]
    assert max_logprob_change(base, [{1: -0.5, 2: -1.0}, {3: -0.1}]) == 0.0
    assert max_logprob_change(base, [{1: -0.5, 4: -9.0}, {3: -0.35}]) == pytest.approx(0.25)  # token 4: base lacks it
    assert max_logprob_change(base, [{1: -0.5}, {5: -0.1}]) == math.inf           # disjoint top-k: changed
    assert max_logprob_change([{1: -math.inf}], [{1: -math.inf}]) == 0.0
    with pytest.raises(ValueError, match="2 base answers for 1"):
        max_logprob_change(base, base[:1])


# ------------------------------------------------------------------ transformers, real PEFT adapters


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny base model, a store with POPE questions on two held-out scenes, and two PEFT adapters
    saved into it: `adapter-zero` as PEFT initialises LoRA (B = 0: a no-op) and `adapter-moved` (B random)."""
    from peft import LoraConfig, get_peft_model

    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tiny_llava, save_vlm
    from m3po_core.stages.benchmarks import write_synthetic_benchmarks

    root = tmp_path_factory.mktemp("adapter-check")
    cfg = load_config(TINY, ["model.device=cpu", "data.world.n_eval_scenes=2", "evaluation.benchmarks=[pope]",
                             "evaluation.max_new_tokens=4"])
    model, processor = build_tiny_llava(world.vocabulary(), seed=0)
    save_vlm(model, processor, str(root / "base"))
    store = RunStore(str(root), "run")
    write_synthetic_benchmarks(cfg, store, world.make_scenes(cfg.seed, "train", 4))
    # the target the training stage uses (m3po_core/training.py)
    target = rf".*language_model.*\.({'|'.join(cfg.training.lora_target_modules)})"
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target, task_type="CAUSAL_LM"))
    peft.save_pretrained(store.path("adapter-zero"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft.save_pretrained(store.path("adapter-moved"))
    return cfg, store, str(root / "base")


def test_a_zero_adapter_is_refused_and_a_moved_one_passes(tiny_run):
    cfg, store, base_ref = tiny_run
    qs = store.read_table("eval/pope.parquet").to_pylist()[:4]
    images = [Image.open(q["image"]).convert("RGB") for q in qs]
    instructions = [q["instruction"] for q in qs]
    base = components.sampler_for(cfg, store, base_ref, None, "transformers")
    top = base.next_token_logprobs(images, instructions, TOP_K)
    assert len(top) == 4 and all(len(t) == TOP_K for t in top)
    # the top-k of a softmax: log-probabilities whose probabilities sum to at most 1
    assert all(max(t.values()) <= 0 and sum(math.exp(v) for v in t.values()) <= 1 + 1e-6 for t in top)

    zero = components.sampler_for(cfg, store, base_ref, components.Adapter("adapter-zero", "zero"), "transformers")
    with pytest.raises(AdapterNoOp, match=r"adapter-zero changes nothing through the transformers backend") as e:
        check_adapter_changes_model(base, zero, images, instructions, min_change=1e-4, backend="transformers",
                                    adapter_dir=store.url("adapter-zero"))
    assert isinstance(e.value, InputError) and "target_modules" in str(e.value)

    moved = components.sampler_for(cfg, store, base_ref, components.Adapter("adapter-moved", "moved"), "transformers")
    logged: list[str] = []
    change = check_adapter_changes_model(base, moved, images, instructions, min_change=1e-4,
                                         backend="transformers", adapter_dir="adapter-moved", log_fn=logged.append)
    assert change > 1e-3 and logged and "adapter check: adapter-moved" in logged[0]


def test_evaluation_stops_on_a_zero_adapter_before_any_trained_prediction(tiny_run):
    from m3po_core.stages.evaluate import _evaluate_model

    cfg, store, base_ref = tiny_run
    stage = "predictions/predictions-trained-pope"
    with pytest.raises(AdapterNoOp, match=r"over 8 probe prompts"):
        _evaluate_model(cfg, store, base_ref, "trained", "predictions", print, weights_key="zero",
                        adapter=components.Adapter("adapter-zero", "zero"))
    assert not store.exists(RunStore.shard_rel(stage, 0))
    assert [e["state"] for e in store.manifest(stage)] == ["failed"]

    logged: list[str] = []
    metrics = _evaluate_model(cfg, store, base_ref, "trained", "predictions", logged.append, weights_key="moved",
                              adapter=components.Adapter("adapter-moved", "moved"))
    assert "pope" in metrics and store.exists(RunStore.shard_rel(stage, 0))
    assert logged[0].startswith("adapter check: ") and "over 8 probes" in logged[0]


def test_no_probes_means_no_check(tiny_run):
    from m3po_core.stages.evaluate import _evaluate_model

    cfg, store, base_ref = tiny_run
    off = load_config(TINY, ["model.device=cpu", "data.world.n_eval_scenes=2", "evaluation.benchmarks=[pope]",
                             "evaluation.max_new_tokens=4", "evaluation.adapter_check_probes=0"])
    metrics = _evaluate_model(off, store, base_ref, "unchecked", "predictions", print, weights_key="zero",
                              adapter=components.Adapter("adapter-zero", "zero"))
    assert "pope" in metrics and store.exists(RunStore.shard_rel("predictions/predictions-unchecked-pope", 0))


# ------------------------------------------------------------------ an OpenAI-compatible server


def logprob_responder(differ: bool):
    """One greedy token whose top logprobs (as vLLM writes them with return_tokens_as_token_ids) are the
    base's, or moved by 0.05 for the adapter when `differ`."""
    def respond(body: dict) -> list[Reply]:
        shift = 0.05 if differ and body["model"] == "tiny-adapter" else 0.0
        top = [("token_id:5", -0.2 - shift), ("token_id:6", -1.9 + shift), ("token_id:9", -3.0)]
        return [Reply("yes", tokens=[top[0]], finish_reason="length", top_logprobs=[top])]
    return respond


def test_openai_path_refuses_identical_logprobs_and_passes_moved_ones(openai_server: FakeOpenAIServer):  # noqa: F811
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    instructions = [f"probe {i}" for i in range(3)]
    settings = dict(max_retries=0, timeout=5.0)
    base = OpenAICompatibleSampler("tiny-base", openai_server.base_url, **settings)
    adapted = OpenAICompatibleSampler("tiny-adapter", openai_server.base_url, **settings)

    openai_server.responder = logprob_responder(differ=False)
    with pytest.raises(AdapterNoOp, match=r"/runs/r/adapter changes nothing through the openai backend "
                                          r"\(served as 'tiny-adapter'\).*vllm-project/vllm#48019"):
        check_adapter_changes_model(base, adapted, images, instructions, min_change=1e-4, backend="openai",
                                    adapter_dir="/runs/r/adapter", served_as="tiny-adapter")
    bodies = [r.body for r in openai_server.requests]
    assert len(bodies) == 6 and {b["model"] for b in bodies} == {"tiny-base", "tiny-adapter"}
    for b in bodies:
        assert (b["max_tokens"], b["temperature"], b["n"]) == (1, 0.0, 1)
        assert b["logprobs"] is True and b["top_logprobs"] == TOP_K and b["return_tokens_as_token_ids"] is True

    openai_server.responder = logprob_responder(differ=True)
    assert base.next_token_logprobs(images[:1], instructions[:1], TOP_K) == [{5: -0.2, 6: -1.9, 9: -3.0}]
    change = check_adapter_changes_model(base, adapted, images, instructions, min_change=1e-4, backend="openai",
                                         adapter_dir="/runs/r/adapter")
    assert change == pytest.approx(0.05)


def test_openai_path_keeps_token_strings_and_names_a_reply_without_top_logprobs(
        openai_server: FakeOpenAIServer):  # noqa: F811
    from m3po_core.sampling.openai_backend import SamplingError

    sampler = OpenAICompatibleSampler("m", openai_server.base_url, max_retries=0, timeout=5.0)
    openai_server.responder = lambda body: [Reply("yes", tokens=[("yes", -0.1)], top_logprobs=[[("yes", -0.1),
                                                                                                 ("no", -2.5)]])]
    assert sampler.next_token_logprobs([Image.new("RGB", (8, 8))], ["q"], 2) == [{"yes": -0.1, "no": -2.5}]
    openai_server.responder = lambda body: [Reply("yes")]
    with pytest.raises(SamplingError, match="prompt 0 .*top_logprobs"):
        sampler.next_token_logprobs([Image.new("RGB", (8, 8))], ["q"], 2)


def test_negative_check_settings_are_refused_by_name():
    from m3po_core.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.adapter_check_probes"):
        load_config(TINY, ["evaluation.adapter_check_probes=-1"])
