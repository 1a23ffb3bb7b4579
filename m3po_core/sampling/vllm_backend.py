"""vLLM offline sampling backend: one `vllm.LLM` engine per worker process, reused across shards.

The prompt is `m3po_core.models.prompt_text(instruction)` (LLaVA-1.5's "USER: <image>\\n... ASSISTANT:"),
the same text the transformers processor tokenises for sampling, DPO training and evaluation;
vLLM's tokenizer for the same checkpoint adds the same BOS and expands `<image>` to the same
576 placeholder tokens (tests/test_vllm_backend.py checks the ids on a GPU). Candidates keep the
sampled token ids exactly as vLLM returns them, EOS included when the request stopped on it, so
training scores the very tokens that were sampled.

Log-probabilities: `SamplingParams(logprobs=0)` returns the sampled token's log-probability at
every step, and the engine runs with `logprobs_mode="raw_logprobs"` (log-softmax of the raw
logits, before temperature and top-p): log P(R | I, Q) under the base model, with no second pass.

Per-prompt seeds (vLLM seeds completion j of a request with seed + j; prompts are n apart) make a
shard's sampled tokens reproducible whatever else the engine is running; their log-probabilities
agree to rounding (vLLM is not batch-invariant unless VLLM_BATCH_INVARIANT=1). Prefix caching is
on (32 samples of a prompt share its image and instruction); tensor parallelism is `sampling.tensor_parallel_size` (13B on
two GPUs). Evaluation passes the trained adapter as a `LoRARequest` (the engine is built with
`enable_lora`), so the base weights are loaded once for both models.

`next_token_logprobs` asks for one greedy token with `logprobs=top_k`: vLLM returns, for that
position, a dict token id -> `Logprob` holding the top-k and the sampled token (raw as above).

vllm is imported only when this backend is built: `pip install '.[vllm]'` on the GPU workers.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from m3po_core.models import prompt_text
from m3po_core.sampling import Candidate, SamplingParams, request_seeds

log = logging.getLogger("m3po.sampling.vllm")


def candidates_from_output(output: Any, seed: int, per_candidate: bool = False) -> list[Candidate]:
    """A vLLM `RequestOutput` (n completions) -> Candidates, in completion-index order; each records
    `seed` (the batch's), or `seed` + its index with `per_candidate` (the request's seed: vLLM drew
    completion j with it + j). Raises ValueError naming what is missing when the request did not ask
    for log-probabilities."""
    out = []
    for c in sorted(output.outputs, key=lambda c: c.index):
        if c.finish_reason not in ("stop", "length"):
            raise ValueError(f"request {output.request_id}: completion {c.index} finished with "
                             f"{c.finish_reason!r} (expected 'stop' or 'length')")
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise ValueError(f"request {output.request_id}: completion {c.index} has no per-token "
                             "log-probabilities (SamplingParams(logprobs=0) was not set)")
        # each step maps token id -> Logprob; the sampled token is always among them
        logp_sum = float(sum(step[t].logprob for step, t in zip(c.logprobs, ids)))
        out.append(Candidate(text=c.text.strip(), token_ids=ids, logp_sum=logp_sum,
                             logp_mean=logp_sum / max(len(ids), 1), n_tokens=len(ids),
                             finish_reason=c.finish_reason, seed=seed + c.index if per_candidate else seed))
    return out


def first_position_logprobs(output: Any) -> dict[int, float]:
    """A vLLM `RequestOutput` -> token id -> log-probability at its first generated position
    (`outputs[0].logprobs[0]`, a dict or a `FlatLogprobs` row). ValueError when none was asked for."""
    c = output.outputs[0]
    if c.logprobs is None or len(c.logprobs) == 0:
        raise ValueError(f"request {output.request_id}: no log-probabilities at the first position "
                         "(SamplingParams(logprobs=k) was not set)")
    return {int(token): float(lp.logprob) for token, lp in c.logprobs[0].items()}


class VLLMSampler:
    name = "vllm"

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = 4096, gpu_memory_utilization: float = 0.9,
                 enable_lora: bool = False, max_lora_rank: int = 64, seed: int = 0, **engine_kwargs: Any) -> None:
        from vllm import LLM

        self.model = model
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True, enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                       seed=seed, logprobs_mode="raw_logprobs", limit_mm_per_prompt={"image": 1},
                       **engine_kwargs)
        self._adapters: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"VLLMSampler(model={self.model!r})"

    @staticmethod
    def requests(images: Sequence[Image.Image], instructions: Sequence[str]) -> list[dict[str, Any]]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images for {len(instructions)} instructions")
        return [{"prompt": prompt_text(q), "multi_modal_data": {"image": img.convert("RGB")}}
                for img, q in zip(images, instructions)]

    def sample(self, images: Sequence[Image.Image], instructions: Sequence[str], params: SamplingParams,
               seed: int | Sequence[int], adapter_dir: str | None = None) -> list[list[Candidate]]:
        from vllm import SamplingParams as VSamplingParams

        # vLLM seeds completion j of a request with seed + j (its parallel-sampling child requests)
        seeds = request_seeds(seed, len(instructions), params.n)
        per_prompt = [VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                      max_tokens=params.max_new_tokens, seed=s, logprobs=0) for s in seeds]
        outputs = self.llm.generate(self.requests(images, instructions), per_prompt, use_tqdm=False,
                                    lora_request=self.lora(adapter_dir))
        return [candidates_from_output(o, seed if isinstance(seed, int) else s, per_candidate=not isinstance(seed, int))
                for o, s in zip(outputs, seeds)]

    def lora(self, adapter_dir: str | None):
        """A LoRARequest for a PEFT adapter directory (ids stable per directory within the process)."""
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        # keyed by content: an adapter directory rewritten in place (a new training) is a new LoRA,
        # where vLLM would keep serving its cached weights under the old id
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        version = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.exists() else ""
        lora_id = self._adapters.setdefault((adapter_dir, version), len(self._adapters) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter_dir)

    def greedy(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int,
               adapter_dir: str | None = None) -> list[str]:
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(self.requests(images, instructions), params, use_tqdm=False,
                                    lora_request=self.lora(adapter_dir))
        return [o.outputs[0].text.strip() for o in outputs]

    def next_token_logprobs(self, images: Sequence[Image.Image], instructions: Sequence[str], top_k: int,
                            adapter_dir: str | None = None) -> list[dict[int, float]]:
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(temperature=0.0, max_tokens=1, logprobs=top_k)
        outputs = self.llm.generate(self.requests(images, instructions), params, use_tqdm=False,
                                    lora_request=self.lora(adapter_dir))
        return [first_position_logprobs(o) for o in outputs]
