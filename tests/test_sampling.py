"""The transformers sampler: N candidates per prompt with raw log-probabilities from the generation."""
import torch

from m3po_core.models import encode_prompts
from m3po_core.sampling import SamplingParams, batch_seed
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


def test_candidates_carry_raw_logprobs_of_what_was_sampled(tiny_vlm, world_batch):
    model, processor = tiny_vlm
    images, instructions = world_batch
    sampler = TransformersSampler(model, processor)
    # a high temperature and top-p < 1 would change tempered/filtered log-probs: raw ones must not change
    params = SamplingParams(n=4, temperature=1.7, top_p=0.8, max_new_tokens=12, seed=0)
    out = sampler.sample(images[:3], instructions[:3], params, seed=123)
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
