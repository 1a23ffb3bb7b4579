"""CLIP scoring at scale: image encodes per prompt and the speed-up of batched scoring.

    python bench/clip_scoring.py [--prompts 32] [--n 32] [--arch m3po-tiny-clip|ViT-L-14] [--pretrained TAG]

Scores N candidates for each of P prompts twice: batched (`ClipScorer.score`, one image encode
per prompt, all candidate texts in batches) and one by one (an image and a text encode per
candidate, as a naive scorer would). Prints image encodes per prompt, wall times and the ratio;
asserts nothing. The tiny CLIP is trained for a few steps here; ViT-L-14 needs its weights.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--arch", default="m3po-tiny-clip")
    ap.add_argument("--pretrained", default=None)
    args = ap.parse_args()
    from m3po_core.data.synthetic import caption, make_scenes, render
    from m3po_core.scoring.clip import load_clip, train_tiny_clip

    scenes = make_scenes(seed=0, split="eval", n=args.prompts)
    images = [render(s) for s in scenes]
    if args.arch == "m3po-tiny-clip":
        train = make_scenes(seed=0, split="train", n=64)
        scorer, _ = train_tiny_clip([render(s) for s in train], [caption(s) for s in train], steps=5, batch_size=32)
    else:
        scorer = load_clip(args.arch, args.pretrained)
    # N distinct candidate texts per prompt: captions of other scenes, rotated
    caps = [caption(s) for s in scenes]
    texts = [[caps[(i + k) % len(caps)] for k in range(args.n)] for i in range(len(scenes))]

    scorer.n_image_encodes = 0
    t0 = time.perf_counter()
    scorer.score(images, texts)
    batched = time.perf_counter() - t0
    per_prompt = scorer.n_image_encodes / len(images)

    t0 = time.perf_counter()
    for image, prompt_texts in zip(images, texts):
        for text in prompt_texts:
            scorer.score([image], [[text]])
    one_by_one = time.perf_counter() - t0

    cands = args.prompts * args.n
    print(f"{args.arch}: {args.prompts} prompts x {args.n} candidates = {cands}")
    print(f"image encodes per prompt (batched): {per_prompt:.2f}   target 1")
    print(f"batched:    {batched:.2f} s ({1e3 * batched / cands:.2f} ms per candidate)")
    print(f"one by one: {one_by_one:.2f} s ({1e3 * one_by_one / cands:.2f} ms per candidate)")
    print(f"speed-up of batched scoring: {one_by_one / batched:.1f}x")


if __name__ == "__main__":
    main()
