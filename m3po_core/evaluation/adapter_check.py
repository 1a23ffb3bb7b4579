"""Guard against a trained LoRA adapter that silently does nothing.

An adapter can load and answer without changing a single logit: vLLM applies a text-only PEFT LoRA
to a LLaVA wrapper as a no-op (vllm-project/vllm#48019), and an adapter whose `target_modules` name
nothing the serving stack maps (or whose B matrices never moved from zero) is a no-op anywhere.
Evaluated, such an adapter reports the base model's numbers as the trained model's. Before the
trained model answers, `check_adapter_changes_model` compares its top-k next-token log-probabilities
on a few probe prompts with the base model's, through the same backend, and raises `AdapterNoOp` if
none moves by `evaluation.adapter_check_min_change`.

Limit: it proves the adapter changes the first generated position on the probes, not that it is the
adapter training produced, nor that it helps. Tokens outside either side's top-k are not compared; a
probe whose top-k sets share no token counts as changed.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

from PIL import Image

from m3po_core.errors import AdapterNoOp

log = logging.getLogger("m3po.evaluation")

TOP_K = 10  # within what vLLM (max_logprobs 20) and OpenAI (top_logprobs <= 20) return


def max_logprob_change(base: Sequence[dict], adapted: Sequence[dict]) -> float:
    """The largest |adapted - base| log-probability over the tokens both report, over all probes
    (inf where a probe's two top-k sets are disjoint)."""
    if len(base) != len(adapted):
        raise ValueError(f"{len(base)} base answers for {len(adapted)} adapted ones")
    worst = 0.0
    for b, a in zip(base, adapted):
        shared = b.keys() & a.keys()
        if not shared:
            return math.inf
        # equal values (both -inf included) are no change; a NaN propagates (that model is not a no-op)
        for t in shared:
            d = 0.0 if a[t] == b[t] else abs(a[t] - b[t])
            if not d <= worst:
                worst = d
    return worst


def _logprobs(sampler, images, instructions, top_k: int, batch_size: int) -> list[dict]:
    out: list[dict] = []
    for i in range(0, len(instructions), batch_size):
        out += sampler.next_token_logprobs(images[i: i + batch_size], instructions[i: i + batch_size], top_k)
    return out


def check_adapter_changes_model(base_sampler, adapted_sampler, images: Sequence[Image.Image],
                                instructions: Sequence[str], *, min_change: float, backend: str, adapter_dir: str,
                                served_as: str | None = None, top_k: int = TOP_K, batch_size: int = 32,
                                log_fn: Callable[[str], None] = log.info) -> float:
    """Raise `AdapterNoOp` unless the adapted sampler's next-token log-probabilities differ from the base
    sampler's by at least `min_change` somewhere on the probes; returns the largest change measured."""
    if not instructions:
        return math.nan
    base = _logprobs(base_sampler, images, instructions, top_k, batch_size)
    adapted = _logprobs(adapted_sampler, images, instructions, top_k, batch_size)
    change = max_logprob_change(base, adapted)
    where = f"the {backend} backend" + (f" (served as {served_as!r})" if served_as else "")
    if change < min_change:
        causes = ["the adapter's target_modules name no module the model applies it to (a misnamed "
                  "training.lora_target_modules, or a pattern the serving stack does not map)",
                  "its LoRA B matrices are all zero (training never updated them: no steps, or a zero learning rate)"]
        if backend in ("vllm", "openai"):
            causes.insert(0, "vLLM loads a text-only PEFT LoRA on a LLaVA wrapper as a no-op "
                             "(vllm-project/vllm#48019): evaluate with evaluation.backend=transformers, which "
                             "merges the adapter, or serve a merged checkpoint")
        raise AdapterNoOp(
            f"the trained adapter {adapter_dir} changes nothing through {where}: over {len(instructions)} probe "
            f"prompts the largest change of a top-{top_k} next-token log-probability is {change:.3g} "
            f"(< evaluation.adapter_check_min_change = {min_change:g}), so its evaluation would report the base "
            f"model's numbers. Likely causes: " + "; ".join(f"({i}) {c}" for i, c in enumerate(causes, start=1))
            + ". (evaluation.adapter_check_probes=0 skips this check.)")
    log_fn(f"adapter check: {adapter_dir} through {where} moves next-token log-probabilities by up to "
           f"{change:.3g} over {len(instructions)} probes (>= {min_change:g})")
    return change
