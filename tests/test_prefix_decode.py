"""The shared-prefix sampler: one prefill per prompt, the same candidates as `generate`, calls sized to memory."""
import pytest
import torch
from transformers import LogitsProcessorList

from m3po_core.errors import InputError
from m3po_core.models import encode_prompts, load_vlm
from m3po_core.sampling import SamplingParams, prompt_seed, request_seeds
from m3po_core.sampling import prefix_decode, transformers_backend
from m3po_core.sampling.transformers_backend import TransformersSampler


@pytest.fixture(scope="module")
def carried():
    """The demo's carried base (warm-started: it stops at EOS, answers differ in length)."""
    from m3po_core.stages.carried import ASSETS

    return load_vlm(str(sorted(ASSETS.glob("tiny-llava-*"))[0]), "cpu", "float32")


@pytest.fixture(scope="module")
def prompts():
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    scenes = world.make_scenes(3, "train", 5)
    rows = synthetic_prompts.make_prompts(scenes, 3, per_scene=1)
    images = {s.scene_id: world.render(s, 64) for s in scenes}
    return [images[r["scene_id"]] for r in rows], [r["instruction"] for r in rows]


class _GumbelPerRow:
    """The per-candidate scheme as it ran inside `generate` before the shared-prefix sampler."""

    def __init__(self, seeds, temperature, top_p):
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).clamp_(1e-12, 1 - 1e-7)
        return scores + (-torch.log(-torch.log(u)))


def generate_reference(sampler, images, instructions, params, seed):
    """(token ids, raw log P sum) per candidate from `generate(num_return_sequences=n)`."""
    model, tok = sampler.model, sampler.processor.tokenizer
    inputs = encode_prompts(sampler.processor, images, instructions)
    common = dict(max_new_tokens=params.max_new_tokens, output_logits=True, return_dict_in_generate=True,
                  eos_token_id=sampler.eos_id, pad_token_id=sampler.pad_id, suppress_tokens=sampler.suppress)
    with torch.no_grad():
        if isinstance(seed, int):
            torch.manual_seed(seed)
            out = model.generate(**inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                 top_k=0, num_return_sequences=params.n, **common)
        else:
            rows = [s + j for s in request_seeds(seed, len(instructions), params.n) for j in range(params.n)]
            inputs = {k: v.repeat_interleave(params.n, dim=0) for k, v in inputs.items()}
            out = model.generate(**inputs, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 logits_processor=LogitsProcessorList([_GumbelPerRow(rows, params.temperature,
                                                                                     params.top_p)]), **common)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    result = []
    for k in range(new.shape[0]):
        ids = new[k].tolist()
        end = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        result.append((ids[:end], float(logp[k, :end].sum())))
    return result


@pytest.mark.parametrize("step_kind", ["shared", "copied"])
@pytest.mark.parametrize("seed", [4242, "candidate"], ids=["batch-seed", "candidate-seeds"])
def test_candidates_and_log_p_are_what_generate_gave(carried, prompts, step_kind, seed):
    """Same seeds, same candidates as the `generate`-based sampler this one replaced; log P within
    float rounding (the prefill runs over 5 rows instead of 40, the attention sums in another order)."""
    model, processor = carried
    images, instructions = prompts
    seed = [prompt_seed(0, f"p{i}") for i in range(len(instructions))] if seed == "candidate" else seed
    params = SamplingParams(n=8, temperature=1.0, top_p=0.95, max_new_tokens=20)
    sampler = TransformersSampler(model, processor, step_kind=step_kind)
    ours = [(c.token_ids, c.logp_sum) for row in sampler.sample(images, instructions, params, seed) for c in row]
    ref = generate_reference(sampler, images, instructions, params, seed)
    assert [ids for ids, _ in ours] == [ids for ids, _ in ref]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, ref)) < 1e-4
    assert len({tuple(ids) for ids, _ in ours}) > 5                     # real samples, not one answer
    assert any(ids[-1] == processor.tokenizer.eos_token_id for ids, _ in ours)
    assert any(len(ids) < params.max_new_tokens for ids, _ in ours)   # rows that stopped early kept their length


@pytest.mark.parametrize("seed", [99, "candidate"], ids=["batch-seed", "candidate-seeds"])
@pytest.mark.parametrize("n", [1, 8, 32])
def test_one_prefill_per_prompt_whatever_n_and_seeding(carried, prompts, seed, n):
    """The language model's forwards over more than one position (prefills) hold one row per prompt."""
    model, processor = carried
    images, instructions = prompts
    seed = [prompt_seed(1, f"q{i}") for i in range(len(instructions))] if seed == "candidate" else seed
    multi_position_rows: list[int] = []
    hook = model.model.language_model.register_forward_hook(
        lambda mod, args, kwargs, out: multi_position_rows.append(kwargs["inputs_embeds"].shape[0])
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        out = TransformersSampler(model, processor).sample(images, instructions,
                                                           SamplingParams(n=n, max_new_tokens=6), seed)
    finally:
        hook.remove()
    assert [len(r) for r in out] == [n] * len(instructions)
    assert multi_position_rows == [len(instructions)]


def test_calls_are_cut_to_the_free_memory_and_give_the_same_candidates(carried, prompts, monkeypatch):
    """A device that holds two prompts' worth per call: three calls for five prompts, and per-candidate
    seeds make the candidates those of one call. (Free memory is CUDA's reading; here it is given.)"""
    model, processor = carried
    images, instructions = prompts
    params = SamplingParams(n=8, max_new_tokens=12)
    seeds = [prompt_seed(2, f"r{i}") for i in range(len(instructions))]
    whole = TransformersSampler(model, processor).sample(images, instructions, params, seeds)
    per = prefix_decode.bytes_per_prompt(model, encode_prompts(processor, images, instructions)["input_ids"].shape[1],
                                         params.n, params.max_new_tokens)
    monkeypatch.setattr(transformers_backend, "free_bytes", lambda device: int(2.5 * per / 0.85))
    calls = []
    real = transformers_backend.decode
    monkeypatch.setattr(transformers_backend, "decode", lambda m, inputs, *a: calls.append(
        inputs["input_ids"].shape[0]) or real(m, inputs, *a))
    cut = TransformersSampler(model, processor).sample(images, instructions, params, seeds)
    assert calls == [2, 2, 1]
    assert [[c.token_ids for c in r] for r in cut] == [[c.token_ids for c in r] for r in whole]
    assert [[c.seed for c in r] for r in cut] == [[c.seed for c in r] for r in whole]


def test_a_prompt_too_large_for_the_free_memory_is_refused_with_its_sizes(carried):
    model, _ = carried
    with pytest.raises(InputError, match=r"n=32 .* 256 tokens"):
        prefix_decode.prompts_per_call(model, 600, 32, 256, cap=8, free=1000)
    assert prefix_decode.prompts_per_call(model, 600, 32, 256, cap=8, free=None) == 8
    per = prefix_decode.bytes_per_prompt(model, 600, 32, 256)
    assert prefix_decode.prompts_per_call(model, 600, 32, 256, cap=8, free=int(3 * per / 0.85) + 1) == 3


def test_the_shared_prompt_is_held_once_in_the_sizing():
    """At LLaVA-1.5-7B shapes a prompt's 32 candidates hold its 594 positions once, not 32 times."""
    from transformers import LlamaConfig

    class Shape(torch.nn.Module):  # the sizing reads only the config and the parameters' dtype
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = []
            self.model.language_model.config = LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                           num_attention_heads=32, num_key_value_heads=32,
                                                           num_hidden_layers=32, vocab_size=32064)
            self.lm_head = torch.nn.Linear(1, 1, dtype=torch.bfloat16)

    shape = Shape()
    assert prefix_decode.kv_bytes_per_position(shape) == 512 * 1024
    per = prefix_decode.bytes_per_prompt(shape, 594, 32, 128)
    assert 594 * 512 * 1024 + 32 * 128 * 512 * 1024 <= per < 32 * 594 * 512 * 1024
