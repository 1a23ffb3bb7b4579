"""The confidence term costs no extra forward pass: log P comes from the sampling pass itself.

    python bench/confidence_passes.py [--prompts 8] [--n 32] [--max-new-tokens 24]

Counts the policy's forward passes (calls of its output head) while the transformers sampler draws N candidates per prompt
(with their log-probabilities), and compares them with the decoding steps generation needs anyway
(one prefill + one call per further new token, i.e. the longest candidate's length). Extra passes
= forward calls - decoding steps; a scorer that re-ran the model over every candidate to get log P
would add one per candidate batch. Uses an untrained tiny LLaVA (the count does not depend on
weights); asserts nothing.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts
    from m3po_core.models import build_tiny_llava
    from m3po_core.sampling import SamplingParams
    from m3po_core.sampling.transformers_backend import TransformersSampler

    model, processor = build_tiny_llava(world.vocabulary())
    model.eval()
    calls = {"n": 0}
    # every pass of the policy ends in its output head (the shared-prefix decoder runs the language
    # model's layers itself, so a hook on the top module would see the prefill only)
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    scenes = world.make_scenes(0, "eval", args.prompts)
    prompts = synthetic_prompts.make_prompts(scenes, 0, per_scene=1)
    images = {s.scene_id: world.render(s) for s in scenes}
    sampler = TransformersSampler(model, processor)
    out = sampler.sample([images[p["scene_id"]] for p in prompts], [p["instruction"] for p in prompts],
                         SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
                         seed=0)
    steps = max(c.n_tokens for cands in out for c in cands)
    n_cands = sum(len(c) for c in out)
    print(f"{args.prompts} prompts x {args.n} candidates = {n_cands}, each with logp_sum/logp_mean")
    print(f"forward calls of the policy: {calls['n']}; decoding steps (longest candidate): {steps}")
    print(f"extra forward passes for the confidence term: {calls['n'] - steps}   target 0")


if __name__ == "__main__":
    main()
