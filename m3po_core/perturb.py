"""Image perturbations for contrastive sampling (IPA, after visual contrastive decoding): the policy
answers about a degraded image, which exposes answers that do not hold up when the evidence is
weak; those answers are shown to it later as what not to say about the clean image.

One perturbation is drawn per sample from `KINDS`, deterministically from a seed:

    noise    Gaussian pixel noise, sd 25 (of 255)
    blur     Gaussian blur, radius 2 px (scaled to the image: 2 px per 64 px of width)
    scale    down-scaled to 1/4 of each side and back (detail lost, layout kept)

The candidate records which (`perturbation`: "" for the clean image, else the kind).
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("noise", "blur", "scale")


def perturb(image: Image.Image, kind: str, seed: int) -> Image.Image:
    image = image.convert("RGB")
    if kind == "noise":
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 25.0, (image.height, image.width, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=2.0 * max(1.0, image.width / 64)))
    if kind == "scale":
        small = image.resize((max(1, image.width // 4), max(1, image.height // 4)), Image.BILINEAR)
        return small.resize(image.size, Image.BILINEAR)
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")


def draw(seed: int, prompt_id: str, index: int) -> tuple[str, int]:
    """The perturbation of sample `index` of a prompt, and the seed it uses (stable across shardings)."""
    rng = random.Random(f"{seed}:{prompt_id}:{index}")
    return rng.choice(KINDS), rng.randrange(2**31)
