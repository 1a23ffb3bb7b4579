"""HF transformers sampling backend: batched `generate` with per-token raw log-probabilities.

`output_logits=True` returns the model's logits before any processor or warper (temperature,
top-p), so log_softmax of them at the sampled token is the raw log-probability: no second pass.
It keeps one logits row per step and sequence, fine for small vocabularies and batches; the vLLM
backend is the one for LLaVA-1.5 at scale.

With per-prompt seeds, every sequence draws its tokens from a generator of its own (Gumbel-max over
the tempered, top-p-filtered logits: the same distribution as `do_sample`), so candidate j of a
prompt depends on its seed alone, not on the batch or on how many candidates were asked for; up to
float rounding of the logits across batch shapes, which can flip a near-tie.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from m3po_core.models import encode_prompts
from m3po_core.sampling import Candidate, SamplingParams, candidate_seed, request_seeds


class PerSequenceSampling(LogitsProcessor):
    """Turns greedy decoding into sampling with one random stream per sequence: temperature, top-p,
    then Gumbel noise from row b's own generator (argmax of logits + Gumbel = a draw from softmax)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).clamp_(1e-12, 1.0 - 1e-7)
        return scores + (-torch.log(-torch.log(u))).to(scores.device)


class TransformersSampler:
    name = "transformers"

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.eos_id = processor.tokenizer.eos_token_id
        self.pad_id = processor.tokenizer.pad_token_id
        # Never sample the image placeholder, padding or BOS: a response holding `<image>` would not
        # line up with the image features when trained on. Suppression acts on the processed
        # logits only; the stored log-probabilities stay raw.
        tok = processor.tokenizer
        image_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
        self.suppress = sorted({i for i in (image_id, tok.pad_token_id, tok.bos_token_id)
                                if i is not None and i != tok.unk_token_id and i != self.eos_id})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, images, instructions):
        return {k: v.to(self.device) for k, v in encode_prompts(self.processor, images, instructions).items()}

    @torch.no_grad()
    def sample(self, images: Sequence[Image.Image], instructions: Sequence[str], params: SamplingParams,
               seed: int | Sequence[int]) -> list[list[Candidate]]:
        inputs = self._inputs(images, instructions)
        common = dict(max_new_tokens=params.max_new_tokens, output_logits=True, return_dict_in_generate=True,
                      eos_token_id=self.eos_id, pad_token_id=self.pad_id, suppress_tokens=self.suppress)
        if isinstance(seed, int):  # one stream for the batch (torch's global generator)
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                      top_k=0, num_return_sequences=params.n, **common)
        else:  # one stream per sequence: rows are prompt-major, as num_return_sequences would lay them out
            rows = [s + j for s in request_seeds(seed, len(instructions), params.n) for j in range(params.n)]
            inputs = {k: v.repeat_interleave(params.n, dim=0) for k, v in inputs.items()}
            out = self.model.generate(**inputs, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      logits_processor=LogitsProcessorList(
                                          [PerSequenceSampling(rows, params.temperature, params.top_p)]), **common)
        prompt_len = inputs["input_ids"].shape[1]
        tokens = out.sequences[:, prompt_len:]                                  # (B*n, T)
        logits = torch.stack(out.logits, dim=1).float()                        # (B*n, T, V), raw
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        # Keep tokens up to and including the first EOS; later positions are padding.
        is_eos = tokens == self.eos_id
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        keep = ~after_eos
        lengths = keep.sum(dim=1)
        logp_sum = (token_logp * keep).sum(dim=1)
        stopped = is_eos.any(dim=1)
        results: list[list[Candidate]] = []
        for i in range(len(instructions)):
            row: list[Candidate] = []
            for j in range(params.n):
                k = i * params.n + j
                n_tok = int(lengths[k])
                ids = tokens[k, :n_tok].tolist()
                text_ids = ids[:-1] if stopped[k] else ids
                row.append(Candidate(
                    text=self.processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                    token_ids=ids, logp_sum=float(logp_sum[k]), logp_mean=float(logp_sum[k]) / max(n_tok, 1),
                    n_tokens=n_tok, finish_reason="stop" if stopped[k] else "length",
                    seed=candidate_seed(seed, i, j),
                ))
            results.append(row)
        return results

    @torch.no_grad()
    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int) -> list[str]:
        inputs = self._inputs(images, instructions)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.eos_id, pad_token_id=self.pad_id, suppress_tokens=self.suppress)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def next_token_logprobs(self, images: Sequence[Image.Image], instructions: Sequence[str],
                            top_k: int) -> list[dict[int, float]]:
        # one step of `generate`, as `greedy` takes it (left padding, its position ids); its logits are raw
        inputs = self._inputs(images, instructions)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=1, output_logits=True,
                                  return_dict_in_generate=True, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)                 # (B, V)
        values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
