"""The vLLM offline backend: its adapter against vLLM's own output types (where vllm imports), and
for real on a GPU (marked `gpu`): the engine sees the prompt tokens training sees, and its raw
log-probabilities match a transformers forward pass over the sampled tokens."""
import math

import pytest

vllm_outputs = pytest.importorskip("vllm.outputs", reason="vllm is not installed (pip install '.[vllm]')",
                                   exc_type=ImportError)
from vllm.logprobs import FlatLogprobs, Logprob, append_logprobs_for_next_position  # noqa: E402

from m3po_core.sampling.vllm_backend import VLLMSampler, candidates_from_output, first_position_logprobs  # noqa: E402

EOS = 2


def _completion(index, ids, logps, finish="stop", flat=False):
    """A CompletionOutput as vLLM's engine builds it with SamplingParams(logprobs=0): per step, the
    sampled token (rank as sampled) and nothing else."""
    logprobs = FlatLogprobs() if flat else []
    for tid, lp in zip(ids, logps):
        append_logprobs_for_next_position(logprobs, [tid], [lp], [f"t{tid}"], rank=1, num_logprobs=0)
    return vllm_outputs.CompletionOutput(index=index, text=f" answer {index} ", token_ids=list(ids),
                                         cumulative_logprob=sum(logps), logprobs=logprobs, finish_reason=finish)


@pytest.mark.parametrize("flat", [False, True])
def test_candidates_from_vllm_request_output(flat):
    out = vllm_outputs.RequestOutput(
        request_id="7", prompt="USER: <image>\nq ASSISTANT:", prompt_token_ids=[1, 5, 6], prompt_logprobs=None,
        outputs=[_completion(1, [9, 10], [-1.0, -3.0], finish="length", flat=flat),
                 _completion(0, [11, 12, EOS], [-0.5, -0.25, -0.25], flat=flat)], finished=True)
    c0, c1 = candidates_from_output(out, seed=42)
    assert c0.token_ids == [11, 12, EOS] and c0.finish_reason == "stop" and c0.n_tokens == 3  # EOS kept
    assert math.isclose(c0.logp_sum, -1.0) and math.isclose(c0.logp_mean, -1.0 / 3)
    assert c1.token_ids == [9, 10] and c1.finish_reason == "length" and math.isclose(c1.logp_sum, -4.0)
    assert c0.text == "answer 0" and c0.seed == c1.seed == 42


def test_a_request_without_logprobs_is_refused_by_name():
    bare = vllm_outputs.CompletionOutput(index=0, text="x", token_ids=[3], cumulative_logprob=None, logprobs=None,
                                         finish_reason="stop")
    out = vllm_outputs.RequestOutput(request_id="r9", prompt="p", prompt_token_ids=[1], prompt_logprobs=None,
                                     outputs=[bare], finished=True)
    with pytest.raises(ValueError, match="request r9: completion 0 has no per-token log-probabilities"):
        candidates_from_output(out, seed=0)


def _greedy_step(request_id, top, flat=False):
    """A RequestOutput as vLLM builds it for SamplingParams(max_tokens=1, temperature=0, logprobs=k): the
    sampled token (the argmax, rank 1) followed by the top-k, one position."""
    logprobs = FlatLogprobs() if flat else []
    (best, best_lp), *_ = top
    append_logprobs_for_next_position(logprobs, [best] + [t for t, _ in top], [best_lp] + [lp for _, lp in top],
                                      [f"t{best}"] + [f"t{t}" for t, _ in top], rank=1, num_logprobs=len(top))
    done = vllm_outputs.CompletionOutput(index=0, text=f"t{best}", token_ids=[best], cumulative_logprob=best_lp,
                                         logprobs=logprobs, finish_reason="length")
    return vllm_outputs.RequestOutput(request_id=request_id, prompt="p", prompt_token_ids=[1], prompt_logprobs=None,
                                      outputs=[done], finished=True)


@pytest.mark.parametrize("flat", [False, True])
def test_first_position_logprobs_are_the_top_k_of_the_first_step(flat):
    out = _greedy_step("3", [(7, -0.25), (3, -1.75), (9, -3.0)], flat=flat)
    assert first_position_logprobs(out) == {7: -0.25, 3: -1.75, 9: -3.0}
    bare = vllm_outputs.RequestOutput(
        request_id="r4", prompt="p", prompt_token_ids=[1], prompt_logprobs=None, finished=True,
        outputs=[vllm_outputs.CompletionOutput(index=0, text="x", token_ids=[3], cumulative_logprob=None,
                                               logprobs=None, finish_reason="length")])
    with pytest.raises(ValueError, match="request r4: no log-probabilities at the first position"):
        first_position_logprobs(bare)


class _Engine:
    """Stands in for `vllm.LLM` (it needs a GPU): records each `generate` call and answers one greedy step
    whose logprobs are moved by `shift` when a LoRA is requested."""

    def __init__(self, shift: float):
        self.shift, self.calls = shift, []

    def generate(self, requests, params, use_tqdm, lora_request):
        self.calls.append((requests, params, lora_request))
        moved = self.shift if lora_request is not None else 0.0
        return [_greedy_step(str(i), [(7, -0.25 - moved), (3, -1.75)]) for i in range(len(requests))]


def _engine(shift: float) -> VLLMSampler:
    sampler = VLLMSampler.__new__(VLLMSampler)  # no LLM: the engine is the recording stand-in
    sampler.model, sampler.llm, sampler._adapters = "llava", _Engine(shift), {}
    return sampler


def test_the_adapter_check_asks_vllm_for_one_greedy_step_with_the_lora(tmp_path, world_batch):
    pytest.importorskip("vllm.sampling_params", reason="vllm's SamplingParams imports uvloop and cpuinfo",
                        exc_type=ImportError)
    from vllm.lora.request import LoRARequest

    from m3po_core.errors import AdapterNoOp
    from m3po_core.evaluation.adapter_check import TOP_K, check_adapter_changes_model
    from m3po_core.sampling import AdapterSampler

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    images, instructions = world_batch
    engine = _engine(shift=0.0)  # the LoRA is loaded but changes nothing (vllm#48019)
    with pytest.raises(AdapterNoOp, match=rf"{tmp_path} changes nothing through the vllm backend.*vllm#48019"):
        check_adapter_changes_model(engine, AdapterSampler(engine, str(tmp_path)), images[:3], instructions[:3],
                                    min_change=1e-4, backend="vllm", adapter_dir=str(tmp_path))
    (_, base_params, no_lora), (requests, params, lora) = engine.llm.calls
    assert no_lora is None and isinstance(lora, LoRARequest) and lora.lora_path == str(tmp_path)
    assert len(requests) == 3 and (params.max_tokens, params.temperature, params.logprobs) == (1, 0.0, TOP_K)
    assert base_params.logprobs == TOP_K

    engine = _engine(shift=0.5)
    change = check_adapter_changes_model(engine, AdapterSampler(engine, str(tmp_path)), images[:3], instructions[:3],
                                         min_change=1e-4, backend="vllm", adapter_dir=str(tmp_path))
    assert math.isclose(change, 0.5)


def test_requests_use_the_training_prompt_format(world_batch):
    from m3po_core.models import prompt_text

    images, instructions = world_batch
    reqs = VLLMSampler.requests(images[:2], instructions[:2])
    assert [r["prompt"] for r in reqs] == [prompt_text(q) for q in instructions[:2]]
    assert all(r["multi_modal_data"]["image"].mode == "RGB" for r in reqs)
    with pytest.raises(ValueError, match="1 images for 2 instructions"):
        VLLMSampler.requests(images[:1], instructions[:2])


@pytest.mark.gpu
def test_vllm_on_a_gpu_sees_the_training_tokens_and_reports_raw_logprobs(tmp_path, world_batch):
    """On a llava-hf layout with a Llama tokenizer (BOS added, `<image>` appended after the vocabulary),
    as llava-1.5-7b-hf ships it (tests/llava_release.py)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from llava_release import build_llava15
    from m3po_core.models import encode_prompts, load_vlm
    from m3po_core.sampling import SamplingParams

    images, instructions = world_batch
    build_llava15(tmp_path / "llava", [*instructions, "USER: ASSISTANT: yes no red blue one two"])
    hf, processor = load_vlm(str(tmp_path / "llava"), "cuda", "float32")
    sampler = VLLMSampler(str(tmp_path / "llava"), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3)
    outputs = sampler.llm.generate(VLLMSampler.requests(images[:2], instructions[:2]), use_tqdm=False)
    expected = encode_prompts(processor, images[:1], instructions[:1])["input_ids"][0].tolist()
    assert expected[0] == processor.tokenizer.bos_token_id
    assert outputs[0].prompt_token_ids == expected  # BOS and image placeholders as training sees them

    params = SamplingParams(n=4, max_new_tokens=8)
    cands = sampler.sample(images[:2], instructions[:2], params, seed=3)
    again = sampler.sample(images[:2], instructions[:2], params, seed=3)
    # seeded draws repeat exactly; the logits may differ in the last bits with another batch mix or a
    # prefix-cache hit (vLLM is not batch-invariant by default)
    assert [[c.token_ids for c in p] for p in cands] == [[c.token_ids for c in p] for p in again]
    for c, d in zip(cands[0], again[0]):
        assert math.isclose(c.logp_sum, d.logp_sum, abs_tol=1e-3 * max(1, c.n_tokens))
    for c in cands[0]:
        enc = {k: v.to("cuda") for k, v in encode_prompts(processor, images[:1], instructions[:1]).items()}
        ids = torch.tensor([c.token_ids], device="cuda")
        enc["input_ids"] = torch.cat([enc["input_ids"], ids], dim=1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        with torch.no_grad():
            logits = hf(**enc).logits[0, -ids.shape[1] - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, :, None]).sum().item()
        assert math.isclose(c.logp_sum, ref, abs_tol=1e-2 * max(1, c.n_tokens))
