"""N candidates per prompt from one prefill: the prompt's keys and values shared by its candidates.

`generate(num_return_sequences=n)` copies each prompt n times before the prefill, so a LLaVA-1.5
prompt (~590 tokens, 576 of them image tokens) is prefilled n times and its keys and values are
held n times; on an H200 at 7B shapes that was 4.5 s of an 8-prompt call and most of its 115 GiB
(../shared/gpu, issue 28). Here each prompt is prefilled once, by the model's own forward, and the
decode loop is ours:

- `LlamaPrefixStep` (language models of model_type `llama`: LLaVA-1.5 7B/13B and the tiny model)
  runs each decode step over the language model's own modules (norms, projections, rotary
  embedding, MLP) with attention in two parts: the candidates' queries against their prompt's keys
  (held once per prompt, read once per prompt per step) and against their own generated keys (a
  buffer allocated once for max_new_tokens, written in place: no cache grows or is copied), merged
  in one softmax. Memory per call: prompts x prompt length + prompts x n x max_new_tokens positions.
- `CopiedCacheStep` (any other language model) copies the prefilled cache to the n candidates
  (transformers' `batch_repeat_interleave`) and steps the model's own forward: one prefill per
  prompt still, but the keys and values are held n times.

Per step only the sampled tokens and their raw log-probabilities are kept, never the logits.
Tokens are chosen as `generate` chooses them (transformers' suppress, temperature and top-p
processors, then `torch.multinomial` from one generator: `BatchStream`) or with one generator per
candidate on the model's device (Gumbel-max: `CandidateStreams`). On the CPU both draw the very
numbers `generate` drew before this module, so candidates match it up to float rounding of the
logits (tests/test_prefix_decode.py compares them); on CUDA a candidate's stream is CUDA's
(Philox), not the CPU's.

`prompts_per_call` sizes a call from the device's free memory. Limits: no CUDA graph or compiled
step yet (each step launches its kernels from Python); a finished candidate keeps its row until
the call ends (as in `generate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from m3po_core.errors import InputError


# ------------------------------------------------------------------------------------------------
# Choosing tokens


class BatchStream:
    """`generate(do_sample=True)`'s choice: suppress, temperature, top-p, softmax, one multinomial
    draw per row from a generator seeded with the batch seed."""

    def __init__(self, seed: int, temperature: float, top_p: float, suppress: list[int], device: torch.device):
        from transformers import (LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        procs = [SuppressTokensLogitsProcessor(suppress, device=device)] if suppress else []
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        self.processors = LogitsProcessorList(procs)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.processors(None, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


class CandidateStreams:
    """One generator per row on the logits' device: suppress, temperature, top-p, then Gumbel noise
    from row r's own generator (argmax of logits + Gumbel = a draw from the softmax), so a row's
    tokens depend on its seed alone, not on the batch it is in."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, suppress: list[int], device: torch.device):
        from transformers import SuppressTokensLogitsProcessor, TopPLogitsWarper

        self.suppress = SuppressTokensLogitsProcessor(suppress, device=device) if suppress else None
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.noise: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = self.suppress(None, logits) if self.suppress is not None else logits
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(None, scores)
        if self.noise is None:
            self.noise = torch.empty_like(scores)
        for row, g in zip(self.noise, self.generators):  # one draw per row from its own stream, on the device
            torch.rand(row.shape, generator=g, out=row, device=row.device)
        u = self.noise.clamp_(1e-12, 1.0 - 1e-7)
        return (scores - torch.log(-torch.log(u))).argmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Decode steps


def _text_parts(model):
    """(the language model's decoder, its output head, its config) of a LLaVA-style model."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", inner)
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(lm, "layers"):
        raise InputError(f"{type(model).__name__}: no language_model with layers and lm_head to decode with")
    return lm, head, lm.config


def prefill(model, inputs: dict[str, torch.Tensor]):
    """One forward over the prompts (image included): the last position's raw logits, the cache,
    and each prompt's real length. Position ids as `generate` derives them from a left-padded mask."""
    from transformers import DynamicCache

    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    out = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values, mask.sum(dim=1)


class LlamaPrefixStep:
    """Decode steps for Llama-shaped language models with the prompt's keys and values held once."""

    def __init__(self, model, cache, mask: torch.Tensor, lengths: torch.Tensor, n: int, max_new_tokens: int):
        self.lm, self.head, cfg = _text_parts(model)
        self.n, self.batch = n, mask.shape[0]
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]          # (B, Hk, P, D) each
        self.prefix_bias = torch.zeros(mask.shape, dtype=self.prefix[0][0].dtype, device=mask.device)
        self.prefix_bias.masked_fill_(mask == 0, torch.finfo(self.prefix_bias.dtype).min)   # left padding
        _, hk, _, d = self.prefix[0][0].shape
        rows = self.batch * n
        kv = self.prefix[0][0]
        self.suffix = [(kv.new_empty(rows, hk, max_new_tokens, d), kv.new_empty(rows, hk, max_new_tokens, d))
                       for _ in self.prefix]
        self.start = lengths.repeat_interleave(n)                                    # position of step 0's input
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.hk, self.d = hk, d

    @staticmethod
    def supports(model) -> bool:
        try:
            _, _, cfg = _text_parts(model)
        except InputError:
            return False
        return cfg.model_type == "llama"

    def _attend(self, layer: int, q: torch.Tensor, t: int, scaling: float) -> torch.Tensor:
        """q (R, Hq, 1, D) against the prompt's keys (B, Hk, P, D) and the row's own first t + 1."""
        b, n, hk, g, d = self.batch, self.n, self.hk, self.group, self.d
        pk, pv = self.prefix[layer]
        sk, sv = (s[:, :, : t + 1] for s in self.suffix[layer])
        qg = q.view(b, n, hk, g, d).permute(0, 2, 1, 3, 4).reshape(b, hk, n * g, d)   # a prompt's candidates together
        pre = torch.matmul(qg, pk.transpose(-1, -2)) * scaling + self.prefix_bias[:, None, None, :]
        pre = pre.view(b, hk, n, g, -1).permute(0, 2, 1, 3, 4).reshape(b * n, hk, g, -1)
        own = torch.matmul(q.view(b * n, hk, g, d), sk.transpose(-1, -2)) * scaling   # (R, Hk, g, t + 1)
        weights = torch.softmax(torch.cat([pre, own], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        wp, wo = weights.split([pre.shape[-1], own.shape[-1]], dim=-1)
        wp = wp.reshape(b, n, hk, g, -1).permute(0, 2, 1, 3, 4).reshape(b, hk, n * g, -1)
        out_p = torch.matmul(wp, pv).view(b, hk, n, g, d).permute(0, 2, 1, 3, 4).reshape(b * n, hk, g, d)
        out = out_p + torch.matmul(wo, sv)
        return out.reshape(b * n, 1, hk * g * d)

    def __call__(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed step t's tokens (R,): write their keys and values at t, return the next raw logits (R, V)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = self.lm.embed_tokens(tokens[:, None])
        cos, sin = self.lm.rotary_emb(x, (self.start + t)[:, None])
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(h.shape[0], 1, -1, self.d).transpose(1, 2)
            k = attn.k_proj(h).view(h.shape[0], 1, -1, self.d).transpose(1, 2)
            v = attn.v_proj(h).view(h.shape[0], 1, -1, self.d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.suffix[i][0][:, :, t] = k[:, :, 0]
            self.suffix[i][1][:, :, t] = v[:, :, 0]
            x = x + attn.o_proj(self._attend(i, q, t, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.lm.norm(x))[:, -1].float()


class CopiedCacheStep:
    """Any language model: the prefilled cache copied to the n candidates, the model's own forward per step."""

    def __init__(self, model, cache, mask: torch.Tensor, lengths: torch.Tensor, n: int, max_new_tokens: int):
        self.model, self.cache = model, cache
        cache.batch_repeat_interleave(n)
        self.mask = torch.cat([mask.repeat_interleave(n, dim=0),
                               mask.new_ones(mask.shape[0] * n, max_new_tokens)], dim=1)
        self.prompt_len, self.start = mask.shape[1], lengths.repeat_interleave(n)

    def __call__(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask[:, : self.prompt_len + t + 1],
                         position_ids=(self.start + t)[:, None], past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()


@dataclass
class Decoded:
    tokens: torch.Tensor     # (R, T): sampled ids; after a row's EOS, padding
    logp: torch.Tensor       # (R, T): raw log P of each sampled token
    steps: int
    prefill_s: float         # wall time of the prefill (synchronised on CUDA)
    decode_s: float          # and of the steps after it


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def decode(model, inputs: dict[str, torch.Tensor], n: int, max_new_tokens: int,
           choose: Callable[[torch.Tensor], torch.Tensor], eos_id: int, pad_id: int,
           step_kind: str = "auto") -> Decoded:
    """Sample n continuations of each prompt in `inputs` (rows prompt-major: row i * n + j is
    candidate j of prompt i); stops when every row has emitted EOS or after max_new_tokens."""
    device = inputs["input_ids"].device
    t0 = _clock(device)
    logits, cache, lengths = prefill(model, inputs)
    t1 = _clock(device)
    kind = LlamaPrefixStep if step_kind == "shared" or (step_kind == "auto" and LlamaPrefixStep.supports(model)) \
        else CopiedCacheStep
    step = kind(model, cache, inputs["attention_mask"], lengths, n, max_new_tokens)
    del cache
    logits = logits.repeat_interleave(n, dim=0)
    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    logp = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=logits.device)
    running = torch.ones(rows, dtype=torch.bool, device=logits.device)
    # Whether any row still runs is a read back from the device, which waits for it: on CUDA it is
    # asked every 8 steps, so the host queues the next steps' kernels while the device runs (rows
    # that ended meanwhile only emit padding); on a CPU, every step.
    check_every = 8 if device.type == "cuda" else 1
    t = 0
    for t in range(max_new_tokens):
        chosen = torch.where(running, choose(logits), pad_id)
        tokens[:, t] = chosen
        logp[:, t] = logits.gather(1, chosen[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        running &= chosen != eos_id
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and not bool(running.any())):
            break
        logits = step(chosen, t)
    return Decoded(tokens, logp, t + 1, t1 - t0, _clock(device) - t1)


# ------------------------------------------------------------------------------------------------
# Sizing a call


def kv_bytes_per_position(model) -> int:
    """Keys and values of one position over all layers, in the model's dtype."""
    _, _, cfg = _text_parts(model)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * size


def bytes_per_prompt(model, prompt_len: int, n: int, max_new_tokens: int) -> int:
    """A call's memory per prompt beyond the weights: its keys and values (shared prompt + n own
    suffixes, or n copied prompts where the shared step does not apply), and the largest transients
    of a step (float32 logits and their processed copies, attention scores, MLP activations) and
    of its prefill."""
    _, _, cfg = _text_parts(model)
    size = next(model.parameters()).element_size()
    kv = kv_bytes_per_position(model)
    shared = LlamaPrefixStep.supports(model)
    held = kv * (prompt_len + n * max_new_tokens) if shared else kv * n * (prompt_len + max_new_tokens)
    step = n * (6 * 4 * cfg.vocab_size + 3 * 4 * cfg.num_attention_heads * (prompt_len + max_new_tokens)
                + 4 * size * cfg.intermediate_size)
    prefill_peak = prompt_len * size * (6 * cfg.hidden_size + 3 * cfg.intermediate_size)
    return held + max(step, prefill_peak)


def free_bytes(device: torch.device) -> int | None:
    """What a call may use on `device`: CUDA's free memory plus what torch's allocator holds unused; None on a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def prompts_per_call(model, prompt_len: int, n: int, max_new_tokens: int, cap: int,
                     free: int | None, headroom: float = 0.85) -> int:
    """As many prompts as `headroom` of the free memory holds (at most `cap`); all of `cap` when the
    free memory is unknown (a CPU). Refuses when one prompt's n candidates do not fit."""
    if free is None:
        return cap
    per = bytes_per_prompt(model, prompt_len, n, max_new_tokens)
    fits = int(free * headroom // per)
    if fits < 1:
        raise InputError(f"sampling: one prompt of {prompt_len} tokens with n={n} candidates of up to "
                         f"{max_new_tokens} tokens needs ~{per / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free: "
                         "lower sampling.n or sampling.max_new_tokens, or free the device")
    return max(1, min(cap, fits))
