"""HF transformers sampling backend: N candidates per prompt from one prefill, with raw log-probabilities.

`sample` prefills each prompt once and decodes its n candidates against the prompt's shared keys
and values (m3po_core/sampling/prefix_decode.py), keeping per step the sampled token and its raw
log-probability (log_softmax of the logits before any processor: no second pass, no logits kept).
A call's prompts are cut into chunks that the device's free memory holds (`prompts_per_call`;
on a CPU, one chunk). The vLLM backend is the one for LLaVA-1.5 at scale.

Seeds: an int is one stream for the call, drawn as `generate(do_sample=True)` draws (chunk c of a
call split for memory uses seed + c). Per-prompt seeds give every candidate a generator of its own
(Gumbel-max over the tempered, top-p-filtered logits: the same distribution as `do_sample`), so
candidate j of a prompt depends on its seed alone, not on the batch or on how many candidates were
asked for; up to float rounding of the logits across batch shapes, which can flip a near-tie.
`greedy` and `next_token_logprobs` use `generate` itself.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from PIL import Image

from m3po_core.models import encode_prompts
from m3po_core.sampling import Candidate, SamplingParams, candidate_seed, request_seeds
from m3po_core.sampling.prefix_decode import BatchStream, CandidateStreams, decode, free_bytes, prompts_per_call

log = logging.getLogger("m3po.sampling")


class TransformersSampler:
    name = "transformers"

    def __init__(self, model, processor, step_kind: str = "auto"):
        self.model = model
        self.step_kind = step_kind  # prefix_decode.decode's: auto, shared (Llama only) or copied
        self.last_timings: list[dict] = []  # per call of the last `sample`: prompts, steps, prefill and decode seconds
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
        per_prompt = None if isinstance(seed, int) else request_seeds(seed, len(instructions), params.n)
        inputs = self._inputs(images, instructions)
        size = prompts_per_call(self.model, inputs["input_ids"].shape[1], params.n, params.max_new_tokens,
                                len(instructions), free_bytes(self.device))
        if size < len(instructions):
            log.info("sampling %d prompts in calls of %d (the device's free memory)", len(instructions), size)
        results: list[list[Candidate]] = []
        self.last_timings = []
        for c, lo in enumerate(range(0, len(instructions), size)):
            part = {k: v[lo: lo + size] for k, v in inputs.items()}  # rows of the batch (pixel_values: one per image)
            if per_prompt is None:
                choose = BatchStream(seed + c, params.temperature, params.top_p, self.suppress, self.device)
            else:
                rows = [s + j for s in per_prompt[lo: lo + size] for j in range(params.n)]
                choose = CandidateStreams(rows, params.temperature, params.top_p, self.suppress, self.device)
            out = decode(self.model, part, params.n, params.max_new_tokens, choose, self.eos_id, self.pad_id,
                         self.step_kind)
            self.last_timings.append({"prompts": part["input_ids"].shape[0], "prompt_len": part["input_ids"].shape[1],
                                      "steps": out.steps, "prefill_s": out.prefill_s, "decode_s": out.decode_s})
            results += self._candidates(out.tokens[:, : out.steps].cpu(), out.logp[:, : out.steps].cpu(),
                                        params.n, seed if per_prompt is not None else seed + c, lo)
        return results

    def _candidates(self, tokens: torch.Tensor, token_logp: torch.Tensor, n: int, seed, offset: int
                    ) -> list[list[Candidate]]:
        # Keep tokens up to and including the first EOS; later positions are padding.
        is_eos = tokens == self.eos_id
        keep = ~((is_eos.cumsum(dim=1) - is_eos.long()) > 0)
        lengths = keep.sum(dim=1)
        logp_sum = (token_logp * keep).sum(dim=1)
        stopped = is_eos.any(dim=1)
        results: list[list[Candidate]] = []
        for i in range(tokens.shape[0] // n):
            row: list[Candidate] = []
            for j in range(n):
                k = i * n + j
                n_tok = int(lengths[k])
                ids = tokens[k, :n_tok].tolist()
                text_ids = ids[:-1] if stopped[k] else ids
                row.append(Candidate(
                    text=self.processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                    token_ids=ids, logp_sum=float(logp_sum[k]), logp_mean=float(logp_sum[k]) / max(n_tok, 1),
                    n_tokens=n_tok, finish_reason="stop" if stopped[k] else "length",
                    seed=candidate_seed(seed, offset + i, j),
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
