"""The transformers sampler: N candidates per prompt with raw log-probabilities from the generation."""
import pytest
import torch

from m3po_core.models import encode_prompts
from m3po_core.sampling import SamplingParams, batch_seed, prompt_seed
from m3po_core.sampling.transformers_backend import TransformersSampler


def teacher_forced_logps(model, processor, image, instruction, token_ids):
    """A second forward pass, only here to check the sampler's numbers."""
    enc = encode_prompts(processor, [image], [instruction])
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"]).logits
    n = len(token_ids)
    logp = torch.log_softmax(logits[0, -n - 1:-1].float(), -1)
    return logp.gather(-1, torch.tensor(token_ids).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("seed", [123, [5, 900, 77]], ids=["batch-seed", "per-prompt-seeds"])
def test_candidates_carry_raw_logprobs_of_what_was_sampled(tiny_vlm, world_batch, seed):
    model, processor = tiny_vlm
    images, instructions = world_batch
    sampler = TransformersSampler(model, processor)
    # a high temperature and top-p < 1 would change tempered/filtered log-probs: raw ones must not change
    params = SamplingParams(n=4, temperature=1.7, top_p=0.8, max_new_tokens=12, seed=0)
    out = sampler.sample(images[:3], instructions[:3], params, seed=seed)
    assert [len(c) for c in out] == [4, 4, 4]
    eos = processor.tokenizer.eos_token_id
    for image, instruction, cands in zip(images, instructions, out):
        for c in cands:
            assert c.n_tokens == len(c.token_ids) > 0
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == eos)
            assert eos not in c.token_ids[:-1]
            assert c.finish_reason == "stop" or c.n_tokens == params.max_new_tokens
            ref = teacher_forced_logps(model, processor, image, instruction, c.token_ids)
            assert abs(ref.sum().item() - c.logp_sum) < 1e-3
            assert abs(c.logp_mean - c.logp_sum / c.n_tokens) < 1e-9
            image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
            assert image_id not in c.token_ids


def test_sampling_is_reproducible_and_seed_dependent(tiny_vlm, world_batch):
    model, processor = tiny_vlm
    images, instructions = world_batch
    sampler = TransformersSampler(model, processor)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=8)
    a = sampler.sample(images[:2], instructions[:2], params, seed=7)
    b = sampler.sample(images[:2], instructions[:2], params, seed=7)
    c = sampler.sample(images[:2], instructions[:2], params, seed=8)
    assert a == b
    assert a != c


def test_batch_seed_depends_on_prompts_not_position():
    assert batch_seed(0, ["a", "b"]) == batch_seed(0, ["a", "b"])
    assert batch_seed(0, ["a", "b"]) != batch_seed(0, ["a", "c"])
    assert batch_seed(0, ["a"]) != batch_seed(1, ["a"])


def test_per_prompt_seeds_make_a_candidate_depend_on_its_seed_alone(tiny_vlm, world_batch):
    """Adaptive sampling asks for k candidates at a time: candidate j must be the same whether 8 or
    16 were asked for, in one call or two, and whatever other prompts share the batch."""
    model, processor = tiny_vlm
    images, instructions = world_batch
    sampler = TransformersSampler(model, processor)
    seeds = [prompt_seed(0, f"p{i}") for i in range(3)]
    sixteen = sampler.sample(images[:3], instructions[:3], SamplingParams(n=16, temperature=1.3, max_new_tokens=10),
                             seed=seeds)
    first = sampler.sample(images[:3], instructions[:3], SamplingParams(n=8, temperature=1.3, max_new_tokens=10),
                           seed=seeds)
    second = sampler.sample(images[:3], instructions[:3], SamplingParams(n=8, temperature=1.3, max_new_tokens=10),
                            seed=[s + 8 for s in seeds])
    alone = sampler.sample(images[2:3], instructions[2:3], SamplingParams(n=8, temperature=1.3, max_new_tokens=10),
                           seed=seeds[2:3])
    for i in range(3):
        assert [c.token_ids for c in sixteen[i]] == [c.token_ids for c in first[i] + second[i]]
        assert [c.seed for c in sixteen[i]] == [seeds[i] + j for j in range(16)]
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in first[2]]
    assert len({tuple(c.token_ids) for c in sixteen[0]}) > 1  # not one answer repeated


def test_per_prompt_seeds_draw_from_the_tempered_nucleus(tiny_vlm, world_batch):
    """Gumbel-max per sequence samples the same distribution as `do_sample`: the first token's
    frequencies over 600 draws match softmax(logits / T) within the top-p nucleus."""
    model, processor = tiny_vlm
    images, instructions = world_batch
    sampler = TransformersSampler(model, processor)
    temperature, top_p, n = 3.0, 0.95, 600
    out = sampler.sample(images[:1], instructions[:1], SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                                                        max_new_tokens=1), seed=[11])[0]
    enc = encode_prompts(processor, images[:1], instructions[:1])
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].float()
    logits[sampler.suppress] = -float("inf")
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    keep = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1]
    nucleus = torch.zeros_like(probs)
    nucleus[keep] = probs[keep] / probs[keep].sum()
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=len(probs)).float()
    assert counts[nucleus == 0].sum() == 0  # nothing outside the nucleus
    top = order[:3]
    assert (counts > 0).sum() >= 3 and nucleus[top[0]] < 0.9  # a real choice between tokens, not one certain one
    for t in top:  # within 4 binomial standard deviations
        sd = (n * nucleus[t] * (1 - nucleus[t])).sqrt()
        assert abs(counts[t] - n * nucleus[t]) < 4 * sd + 1
