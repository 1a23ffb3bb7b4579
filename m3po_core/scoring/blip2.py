"""BLIP-2 image-text matching (ITM) as the alignment encoder of MAS, through transformers.

The paper names CLIP ViT-L/14 "or BLIP-2". BLIP-2's ITM head reads the image (through the Q-Former's
cross-attention) and the text together and says whether they match: its match probability,
softmax(itm_logits)[1], lies in [0, 1] already and enters MAS as it is (`unit_scores`), where a
CLIP cosine is mapped by (cos + 1) / 2.

Same interface as `ClipScorer`: `score(images, texts_per_image)`, each image's vision features
computed once (`n_image_encodes` counts them) and its candidates batched through the Q-Former. The
computation is `Blip2ForImageTextRetrieval.forward(..., use_image_text_matching_head=True)` split
in two so the vision tower runs once per image (tests/test_blip2.py checks the split gives the
same probabilities as the model's own forward). Texts longer than `max_text_tokens` (BLIP-2's
Q-Former takes 512 positions; the checkpoints were trained on 35) are truncated by the tokenizer.

Names: `blip2:<hub name or directory>`, e.g. `blip2:Salesforce/blip2-itm-vit-g`, or a directory
holding a `blip-2` checkpoint (config.json, weights, the image processor and tokenizer files).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PREFIX = "blip2:"


def is_blip2(name: str) -> bool:
    if name.startswith(PREFIX):
        return True
    config = Path(name) / "config.json"
    if config.is_file():
        import json

        return json.loads(config.read_text()).get("model_type") == "blip-2"
    return False


class Blip2ItmScorer:
    kind = "probability"  # scores in [0, 1]: MAS uses them as they are

    def __init__(self, model, image_processor, tokenizer, *, device: str = "cpu", batch_size: int = 64,
                 max_text_tokens: int = 512, arch: str = "blip2") -> None:
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.arch = arch
        self.metrics: dict = {}
        self.n_image_encodes = 0
        self.n_text_encodes = 0

    @staticmethod
    def unit_scores(raw: np.ndarray) -> np.ndarray:
        return raw

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The vision tower's patch features, shape (len(images), patches, hidden)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start: start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            dtype = next(self.model.vision_model.parameters()).dtype
            out.append(self.model.vision_model(pixel_values=pixels.to(self.device, dtype))[0])
            self.n_image_encodes += len(batch)
        return torch.cat(out)

    @torch.no_grad()
    def _match(self, image_embeds: torch.Tensor, texts: list[str]) -> np.ndarray:
        """Match probability of one image's features with each text."""
        m = self.model
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt").to(self.device)
        b = len(texts)
        query_tokens = m.query_tokens.expand(b, -1, -1)
        n_query = query_tokens.shape[1]
        attention_mask = torch.cat([torch.ones(b, n_query, dtype=tok["attention_mask"].dtype, device=self.device),
                                    tok["attention_mask"]], dim=1)
        image = image_embeds.unsqueeze(0).expand(b, -1, -1)
        query_embeds = m.embeddings(input_ids=tok["input_ids"], query_embeds=query_tokens)
        hidden = m.qformer(query_embeds=query_embeds, query_length=n_query, attention_mask=attention_mask,
                           encoder_hidden_states=image,
                           encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=self.device),
                           return_dict=True).last_hidden_state
        logits = m.itm_head(hidden[:, :n_query, :].to(m.itm_head.weight.dtype)).mean(dim=1)
        self.n_text_encodes += b
        return logits.float().softmax(dim=-1)[:, 1].cpu().numpy()

    def score(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} lists of texts")
        features = self.encode_images(images)
        out = []
        for i, prompt_texts in enumerate(texts):
            parts = [self._match(features[i], list(prompt_texts[s: s + self.batch_size]))
                     for s in range(0, len(prompt_texts), self.batch_size)]
            out.append(np.concatenate(parts) if parts else np.zeros(0))
        return out

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


def load_blip2(name: str, device: str = "cpu", dtype: str | None = None) -> Blip2ItmScorer:
    """A BLIP-2 ITM scorer from a hub name or a local directory (`blip2:` prefix optional)."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessor

    path = name.removeprefix(PREFIX)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch_dtype)
    return Blip2ItmScorer(model, BlipImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                          device=device, arch=name)
