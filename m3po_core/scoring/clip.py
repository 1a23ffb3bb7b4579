"""CLIP image-text similarity for the Multimodal Alignment Score, built on open_clip.

Real models come from open_clip by architecture name and pretrained tag or
checkpoint path; tests and CPU demos use "m3po-tiny-clip", a small architecture
registered with open_clip here and trained from scratch by ``train_tiny_clip``.
"""

import contextlib
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

TINY_CLIP = "m3po-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2
    },
    # No hf_tokenizer_name: open_clip uses its SimpleTokenizer, whose BPE vocab
    # ships inside the package, so nothing is downloaded.
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}

# File names open_clip's "local-dir:" loader looks for.
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_pytorch_model.bin"
WORD_CACHE = 200_000  # words whose token counts `chunks` keeps
M3PO_INFO_FILE = "m3po_clip.json"


def normalise(cos: np.ndarray | float) -> np.ndarray | float:
    """Map cosine similarity from [-1, 1] to [0, 1] as (cos + 1) / 2."""
    return (cos + 1) / 2


CLIPSCORE_W = 2.5  # CLIPScore's rescaling (Hessel et al., 2021)


def clipscore(cos: np.ndarray | float) -> np.ndarray | float:
    """CLIPScore in [0, 1]: min(max(2.5 * cos, 0), 1). A pretrained CLIP's image-text cosines sit in a
    narrow positive band, which this spreads over most of [0, 1]."""
    return np.clip(CLIPSCORE_W * np.maximum(cos, 0), 0, 1)


COSINE_TO_UNIT = {"affine": normalise, "clipscore": clipscore}


def unit_scores(encoder, raw: np.ndarray, mapping: str = "affine") -> np.ndarray:
    """An encoder's raw scores in [0, 1]: cosines through `mapping` (`scoring.clip_mapping`), other
    scores (BLIP-2's match probability, an ensemble's mean) as the encoder maps them."""
    if getattr(encoder, "kind", None) == "cosine":
        return COSINE_TO_UNIT[mapping](raw)
    return encoder.unit_scores(raw)


@functools.cache
def register_tiny_clip() -> None:
    """Make "m3po-tiny-clip" an open_clip architecture name (once per process).

    open_clip registers configs from JSON files named after the architecture,
    so the config is written to a private temporary directory first.
    """
    config_file = Path(tempfile.mkdtemp(prefix="m3po-open-clip-")) / f"{TINY_CLIP}.json"
    config_file.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_file)


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer, scoring image-text pairs."""

    kind = "cosine"  # scores in [-1, 1]: MAS maps them to [0, 1] (`unit_scores`)
    unit_scores = staticmethod(normalise)

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        arch: str,
        model_cfg: dict,
        device: str = "cpu",
        batch_size: int = 256,
        metrics: dict | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.arch = arch
        self.model_cfg = model_cfg
        self.device = device
        self.batch_size = batch_size
        self.metrics = metrics or {}
        # Counted so benchmarks can show each prompt's image is encoded once.
        self.n_image_encodes = 0
        self.n_text_encodes = 0
        # Token counts by word for `chunks`: the tokenizer's text cleaning (ftfy) costs ~0.1 ms a call,
        # and 32 long answers a prompt repeat the same few thousand words. Bounded, cleared when full.
        self._word_tokens: dict[str, int] = {}

    @property
    def image_size(self) -> int | tuple[int, int]:
        return self.model.visual.image_size

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, shape (len(images), embed_dim)."""
        self.model.eval()
        features = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(image) for image in batch])
            features.append(self.model.encode_image(pixels.to(self.device), normalize=True))
            self.n_image_encodes += len(batch)
        return torch.cat(features)

    def chunks(self, text: str) -> list[tuple[str, int]]:
        """The text in pieces that fit the text encoder's context, each with its token count.

        Greedy over words: a piece grows while its tokens (without the start/end tokens) fit in
        ``context_length - 2``; a single word longer than that is left to the tokenizer to cut.
        A tokenizer without ``encode`` (no way to count) gives the text whole.
        """
        encode = getattr(self.tokenizer, "encode", None)
        limit = getattr(self.tokenizer, "context_length", 77) - 2
        if encode is None:
            return [(text, 1)]
        n = len(encode(text))
        if n <= limit:
            return [(text, max(n, 1))]
        pieces, words, count = [], [], 0
        for word in text.split():
            k = self._word_tokens.get(word)
            if k is None:
                if len(self._word_tokens) >= WORD_CACHE:
                    self._word_tokens.clear()
                k = self._word_tokens[word] = len(encode(word))
            if words and count + k > limit:
                pieces.append((" ".join(words), count))
                words, count = [], 0
            words.append(word)
            count += k
        if words:
            pieces.append((" ".join(words), count))
        return pieces

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings, shape (len(texts), embed_dim). Each text is cut to the
        context by the tokenizer; `score` instead scores long texts in chunks."""
        self.model.eval()
        features = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            tokens = self.tokenizer(batch).to(self.device)
            features.append(self.model.encode_text(tokens, normalize=True))
            self.n_text_encodes += len(batch)
        return torch.cat(features)

    def score(
        self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """Cosine similarity of image i with each of texts[i], one array per prompt.

        Each image is encoded once; the texts of all prompts are encoded together in batches of
        ``batch_size``. A text longer than the encoder's context (77 tokens for ViT-L/14) is not
        truncated: it is cut into chunks that fit (``chunks``) and its score is the token-weighted
        mean of its chunks' cosines, so every part of a long answer counts for its length (a
        hallucinated tail lowers the score instead of being cut off).
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} lists of texts")
        image_features = self.encode_images(images)
        pieces, owner, weight = [], [], []   # every chunk, the (prompt, text) it belongs to, its tokens
        for i, prompt_texts in enumerate(texts):
            for j, text in enumerate(prompt_texts):
                for piece, n_tokens in self.chunks(text):
                    pieces.append(piece)
                    owner.append((i, j))
                    weight.append(n_tokens)
        if pieces:
            text_features = self.encode_texts(pieces)
        else:
            text_features = image_features.new_zeros(0, image_features.shape[1])
        prompt_of = torch.tensor([i for i, _ in owner], dtype=torch.long, device=text_features.device)
        chunk_sims = ((text_features * image_features[prompt_of]).sum(dim=1).cpu().numpy()
                      if pieces else np.zeros(0))
        sums = [np.zeros(len(t)) for t in texts]
        totals = [np.zeros(len(t)) for t in texts]
        for (i, j), sim, w in zip(owner, chunk_sims, weight):
            sums[i][j] += w * sim
            totals[i][j] += w
        return [s_ / np.maximum(t_, 1e-12) for s_, t_ in zip(sums, totals)]

    def save(self, directory: str | Path) -> Path:
        """Write weights and configs so ``load_clip(directory)`` reloads offline.

        The layout is open_clip's own "local-dir:" layout plus ``m3po_clip.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        open_clip_config = {
            "model_cfg": self.model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.model),
        }
        (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(open_clip_config, indent=2))
        torch.save(self.model.state_dict(), directory / OPEN_CLIP_WEIGHTS_FILE)
        info = {"arch": self.arch, "image_size": self.image_size, "metrics": self.metrics}
        (directory / M3PO_INFO_FILE).write_text(json.dumps(info, indent=2))
        return directory


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu") -> ClipScorer:
    """Load a CLIP scorer.

    ``name`` is an open_clip architecture (e.g. "ViT-L-14", or "m3po-tiny-clip")
    with ``pretrained`` an open_clip tag (downloaded by open_clip, so it needs
    hub access) or a local checkpoint path; or ``name`` is a directory written
    by ``ClipScorer.save`` (``pretrained`` is then ignored).
    """
    register_tiny_clip()
    directory = Path(name)
    if name not in open_clip.list_models() and directory.is_dir():
        open_clip_name = f"local-dir:{directory}"
        info_file = directory / M3PO_INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        arch = info.get("arch", directory.name)
        metrics = info.get("metrics", {})
        pretrained = None
    else:
        open_clip_name, arch, metrics = name, name, {}
    model_cfg = open_clip.get_model_config(open_clip_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture or directory: {name!r}")
    with _without_random_init_warning(open_clip_name if open_clip_name == TINY_CLIP and not pretrained else None):
        model, _, preprocess = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=pretrained, device=device
        )
    return ClipScorer(
        model,
        preprocess,
        open_clip.get_tokenizer(open_clip_name),
        arch=arch,
        model_cfg=model_cfg,
        device=device,
        metrics=metrics,
    )


@contextlib.contextmanager
def _without_random_init_warning(model_name: str | None):
    """open_clip warns (on the root logger) when it builds a model with no weights; the tiny CLIP is
    built that way on purpose, to be trained here, so that one warning is dropped for it."""
    if model_name is None:
        yield
        return
    text = f"No pretrained weights loaded for model '{model_name}'"
    drop = lambda record: not record.getMessage().startswith(text)
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def load_encoder(name: str, pretrained: str | None = None, device: str = "cpu"):
    """The alignment encoder of MAS by name, one call for all: an open_clip architecture (with a
    pretrained tag or checkpoint), a directory saved by `ClipScorer.save`, or BLIP-2 image-text
    matching (`blip2:<hub name or directory>`, or a directory with a `blip-2` checkpoint). Every
    encoder has `score(images, texts_per_image)` and `unit_scores(raw) -> [0, 1]`."""
    from m3po_core.scoring.blip2 import is_blip2, load_blip2

    if is_blip2(name):
        return load_blip2(name, device)
    return load_clip(name, pretrained, device)


def train_tiny_clip(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    heldout_images: Sequence[Image.Image] | None = None,
    heldout_captions: Sequence[str] | None = None,
    negatives: Sequence[Sequence[str]] | None = None,
    heldout_negatives: Sequence[Sequence[str]] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[ClipScorer, dict]:
    """Train "m3po-tiny-clip" from scratch on CPU with open_clip's ClipLoss, plus, given `negatives`
    (per image, captions that get it wrong), a cross-entropy of each image over its own caption and
    its wrong ones at the model's temperature, so the true caption must beat each near miss, not
    only the batch's other scenes (open_clip has no such term).

    Returns the scorer and metrics ``{"steps", "final_loss", "retrieval_top1",
    "retrieval_chance", "retrieval_batch", "retrieval_split"}``. Retrieval is
    image-to-text top-1 accuracy within batches of ``batch_size`` held-out
    pairs (the training pairs when no held-out set is given); since captions of
    the same scene layout repeat, a hit means the top caption string equals
    the true one. With `heldout_negatives`, "hard_negative_accuracy" is the share of (image, wrong
    caption) pairs whose true caption scores higher.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    log = log or (lambda message: None)
    torch.manual_seed(seed)
    scorer = load_clip(TINY_CLIP)
    model = scorer.model.train()
    pixels = torch.stack([scorer.preprocess(image) for image in images])
    tokens = scorer.tokenizer(list(captions))
    if negatives is not None:
        if len(negatives) != len(images) or len({len(n) for n in negatives}) != 1:
            raise ValueError(f"negatives: need the same number of wrong captions for each of the {len(images)} images")
        k = len(negatives[0])
        negative_tokens = scorer.tokenizer([t for n in negatives for t in n]).view(len(images), k, -1)

    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    sampler = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    started = time.monotonic()
    for step in range(1, steps + 1):
        batch = torch.randperm(len(images), generator=sampler)[:batch_size]
        image_features, text_features, logit_scale = model(pixels[batch], tokens[batch])
        loss = loss_fn(image_features, text_features, logit_scale)
        if negatives is not None:
            wrong = model.encode_text(negative_tokens[batch].flatten(0, 1), normalize=True).view(len(batch), k, -1)
            logits = logit_scale * torch.cat([(image_features * text_features).sum(-1, keepdim=True),
                                              torch.einsum("bd,bkd->bk", image_features, wrong)], dim=1)
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            # As in open_clip's training loop: keep the temperature at most 100.
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps:
            log(f"tiny CLIP step {step}/{steps}: loss {loss.item():.3f} "
                f"({time.monotonic() - started:.0f}s)")
    model.eval()

    if heldout_images is None or heldout_captions is None:
        eval_images, eval_captions, split = images, captions, "train"
    else:
        eval_images, eval_captions, split = heldout_images, heldout_captions, "heldout"
    retrieval_batch = min(batch_size, len(eval_images))
    metrics = {
        "steps": steps,
        "final_loss": loss.item(),
        "retrieval_top1": retrieval_top1(scorer, eval_images, eval_captions, retrieval_batch),
        "retrieval_chance": 1 / retrieval_batch,
        "retrieval_batch": retrieval_batch,
        "retrieval_split": split,
    }
    if heldout_negatives is not None and heldout_images is not None:
        metrics["hard_negative_accuracy"] = hard_negative_accuracy(scorer, heldout_images, heldout_captions, heldout_negatives)
        log(f"tiny CLIP held-out: true caption above a wrong one in {metrics['hard_negative_accuracy']:.3f} of pairs")
    log(f"tiny CLIP {split} retrieval top-1 {metrics['retrieval_top1']:.3f} "
        f"(chance {metrics['retrieval_chance']:.3f})")
    scorer.metrics = metrics
    return scorer, metrics


def hard_negative_accuracy(scorer: ClipScorer, images, captions, negatives) -> float:
    """The share of (image, wrong caption) pairs where the image's true caption scores higher."""
    with torch.no_grad():
        image_features = scorer.encode_images(list(images))
        true = (image_features * scorer.encode_texts(list(captions))).sum(-1)
        k = len(negatives[0])
        wrong = scorer.encode_texts([t for n in negatives for t in n]).view(len(images), k, -1)
        return float((true[:, None] > torch.einsum("bd,bkd->bk", image_features, wrong)).float().mean())


def retrieval_top1(
    scorer: ClipScorer,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    batch_size: int,
) -> float:
    """Image-to-text top-1 accuracy within consecutive batches of pairs.

    A hit is a top caption whose string equals the image's own caption, so
    duplicate captions in a batch are not counted as misses.
    """
    hits = 0
    for start in range(0, len(images), batch_size):
        batch_captions = list(captions[start : start + batch_size])
        similarity = scorer.encode_images(images[start : start + batch_size]) @ (
            scorer.encode_texts(batch_captions).T
        )
        best = similarity.argmax(dim=1).tolist()
        hits += sum(batch_captions[j] == truth for j, truth in zip(best, batch_captions))
    return hits / len(images)
