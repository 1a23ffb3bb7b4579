"""Vision-language models: one factory for the tiny offline LLaVA and real LLaVA-1.5 checkpoints.

`load_vlm(name_or_path)` returns `(model, processor)` for both: a directory written by
`save_vlm` (the tiny model built here) or any `llava-hf/llava-1.5-*-hf` name or local copy.
The tiny model uses the very classes of `llava-hf/llava-1.5-7b-hf` (LlavaForConditionalGeneration,
LlavaProcessor, a CLIP vision tower, a Llama language model) at a size a CPU trains in a minute,
with a word-level tokenizer built in memory from the synthetic world's vocabulary.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image

log = logging.getLogger("m3po.models")

# LLaVA-1.5's single-turn chat format (llava-hf model cards); sampling, training and evaluation
# all build prompts through `prompt_text`, so they see the same tokens.
LLAVA_PROMPT = "USER: <image>\n{instruction} ASSISTANT:"
IMAGE_TOKEN = "<image>"
TINY_NAME = "tiny-llava"


def prompt_text(instruction: str) -> str:
    return LLAVA_PROMPT.format(instruction=instruction)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -------------------------------------------------------------------------------------------------
# The tiny LLaVA


@dataclass(frozen=True)
class TinyLlavaSpec:
    image_size: int = 64
    patch_size: int = 32      # one image token per cell of the 2x2 grid: cheap, and learnable in minutes
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 3
    heads: int = 4


def build_tokenizer(vocabulary: Sequence[str]):
    """A word-level fast tokenizer (lower-cased, words and punctuation split), made in memory."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    chat = ["user", "assistant", ":"]
    words = list(dict.fromkeys([*chat, *vocabulary]))
    vocab = {tok: i for i, tok in enumerate([*specials, *[w for w in words if w not in specials]])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def llava_parts(tokenizer, text: dict, vision: dict):
    """The LlavaConfig and LlavaProcessor of llava-1.5's layout (a CLIP tower whose CLS token the
    "default" strategy drops, a Llama language model) for `tokenizer` and the two towers' settings
    (LlamaConfig's and CLIPVisionConfig's keyword arguments): the tiny model and bench/gpu_check.py's
    7B-shaped one are built the same way."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    text_config = LlamaConfig(**{**text, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         do_center_crop=True)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # the CLS token
    )
    return config, processor


def set_special_tokens(model, tokenizer) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))


def build_tiny_llava(vocabulary: Sequence[str], spec: TinyLlavaSpec = TinyLlavaSpec(), seed: int = 0):
    """A randomly initialised LLaVA with the classes of llava-1.5, sized for a CPU."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(vocabulary)
    config, processor = llava_parts(
        tokenizer,
        text=dict(hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
                  num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.heads, max_position_embeddings=512),
        vision=dict(hidden_size=spec.vision_width, intermediate_size=2 * spec.vision_width,
                    num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                    image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_width))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    set_special_tokens(model, tokenizer)
    return model, processor


def save_vlm(model, processor, directory: str) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def load_vlm(name_or_path: str, device: str = "auto", dtype: str = "float32"):
    """Load a LLaVA model and its processor from a hub name or a directory (real or tiny)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dev = pick_device(device)
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=_DTYPES[dtype]).to(dev)
    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:  # llava-1.5 ships a pad token; be safe for others
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model.eval()
    return model, processor


# -------------------------------------------------------------------------------------------------
# Inputs shared by sampling, training and evaluation


def encode_prompts(processor, images: Sequence[Image.Image], instructions: Sequence[str]):
    """Tokenise prompts exactly once, the same way for sampling, DPO training and evaluation.

    Left padding (generation appends on the right); special tokens as the processor adds them
    (BOS for llava-1.5's Llama tokenizer, none for the tiny word-level one).
    """
    return processor(
        images=list(images), text=[prompt_text(q) for q in instructions], padding=True,
        padding_side="left", return_tensors="pt",
    )


def completion_ids(processor, text: str, add_eos: bool) -> list[int]:
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [processor.tokenizer.eos_token_id] if add_eos else ids


# -------------------------------------------------------------------------------------------------
# Warm start: supervised training of the tiny model into a partly-right base policy


def supervised_warm_start(
    model, processor, images: Sequence[Image.Image], instructions: Sequence[str], answers: Sequence[str],
    *, steps: int, batch_size: int, lr: float, seed: int = 0, log_fn: Callable[[str], None] | None = None,
) -> list[float]:
    """Teacher-forced next-token training on (image, instruction, reference answer + EOS).

    Loss on answer tokens only. Few steps on purpose: the base policy must stay partly wrong so
    that its own samples hold both right and confidently wrong answers.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(images)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = encode_prompts(processor, [images[i] for i in idx], [instructions[i] for i in idx])
        targets = [completion_ids(processor, answers[i], add_eos=True) for i in idx]
        width = max(map(len, targets))
        pad_id = processor.tokenizer.pad_token_id
        tgt = torch.full((len(idx), width), pad_id, dtype=torch.long)
        tgt_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, t in enumerate(targets):  # right-pad answers after left-padded prompts
            tgt[r, : len(t)] = torch.tensor(t)
            tgt_mask[r, : len(t)] = 1
        input_ids = torch.cat([batch["input_ids"], tgt], dim=1).to(dev)
        attention = torch.cat([batch["attention_mask"], tgt_mask], dim=1).to(dev)
        labels = torch.cat([torch.full_like(batch["input_ids"], -100), tgt.masked_fill(tgt_mask == 0, -100)], 1)
        out = model(input_ids=input_ids, attention_mask=attention, pixel_values=batch["pixel_values"].to(dev),
                    labels=labels.to(dev))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if log_fn and (step % 50 == 0 or step == steps - 1):
            log_fn(f"warm start step {step + 1}/{steps} loss {out.loss.item():.3f}")
    model.eval()
    return losses
