"""The shared-prefix sampler against `generate(num_return_sequences=n)` on the CPU, at LLaVA-1.5's prompt shape.

    .venv/bin/python bench/sampler_speed.py [--prompts 2] [--n 32] [--tokens 32] [--width 256] [--layers 4]

A Llama-LLaVA with a 336-px, 14-px-patch vision tower (576 image tokens, as LLaVA-1.5's prompts
have) and a narrow language model (--width, --layers; vocabulary 32,064), random weights, so every
candidate runs to --tokens. Both samplers draw the same candidates (tests/test_prefix_decode.py);
this prints the wall time of each, their ratio, and how far each raised the process's peak resident
memory (the shared sampler runs first, so generate's figure is what it needed beyond that), over
--repeats runs (the best of each). Run it in more than one numerical environment
(`OMP_NUM_THREADS=1`, `ATEN_CPU_CAPABILITY=default`) to see the spread. What it cannot say: the GPU's
figures (docs/gpu.md, bench/gpu_check.py), where the decode step's cost is memory traffic, not
arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def generate_sampler(sampler, images, instructions, params, seed: int):
    """What the transformers backend did before: each prompt copied n times, then `generate`."""
    from m3po_core.models import encode_prompts

    inputs = encode_prompts(sampler.processor, images, instructions)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = sampler.model.generate(**inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                     top_k=0, num_return_sequences=params.n, max_new_tokens=params.max_new_tokens,
                                     output_logits=True, return_dict_in_generate=True, eos_token_id=sampler.eos_id,
                                     pad_token_id=sampler.pad_id, suppress_tokens=sampler.suppress)
    return out.sequences[:, inputs["input_ids"].shape[1]:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import gpu_check
    from m3po_core.sampling import SamplingParams
    from m3po_core.sampling.transformers_backend import TransformersSampler

    shape = {**gpu_check.SHAPES["tiny"], "dtype": "float32"}
    shape["text"] = {**shape["text"], "vocab_size": 32064, "hidden_size": args.width,
                     "intermediate_size": int(2.6875 * args.width), "num_hidden_layers": args.layers,
                     "num_attention_heads": max(args.width // 64, 1), "num_key_value_heads": max(args.width // 64, 1),
                     "max_position_embeddings": 4096}
    shape["vision"] = {**shape["vision"], "image_size": 336, "patch_size": 14, "num_hidden_layers": 1}
    torch.manual_seed(0)
    model, processor = gpu_check.build_llava(shape, "cpu")
    sampler = TransformersSampler(model, processor)
    images, instructions = gpu_check.world_prompts(args.prompts)
    params = SamplingParams(n=args.n, temperature=0.9, top_p=0.95, max_new_tokens=args.tokens)
    sampler.sample(images[:1], instructions[:1], SamplingParams(n=2, max_new_tokens=2), 0)   # warm-up
    rows = {}
    for name, fn in (("shared_prefix", lambda: sampler.sample(images, instructions, params, 7)),
                     ("generate", lambda: generate_sampler(sampler, images, instructions, params, 7))):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        best = min(_timed(fn) for _ in range(args.repeats))
        rows[name] = {"seconds": round(best, 3),
                      "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1)}
    prompt_len = sampler.last_timings[0]["prompt_len"]
    result = {"env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY")},
              "torch_threads": torch.get_num_threads(), "prompt_len": prompt_len, **vars(args), **rows,
              "generate_over_shared": round(rows["generate"]["seconds"] / rows["shared_prefix"]["seconds"], 2)}
    print(json.dumps(result))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
