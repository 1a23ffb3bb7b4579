"""Stand-ins for everything `configs/llava15-7b.yaml` reads, in the layouts of the real releases.

Nothing can be downloaded here, so the tests make each input at toy size and in the very format the
docs/llava15.md tells a user to put on disk:

- `llava-1.5-7b-hf/`: a `LlavaForConditionalGeneration` + `LlavaProcessor` directory as
  `llava-hf/llava-1.5-7b-hf` ships it: a CLIP vision tower with 14-px patches (CLS dropped by the
  "default" feature strategy), a Llama language model and a Llama tokenizer (sentencepiece-style BPE
  with byte fallback, BOS added, `<image>` and `<pad>` appended after the base vocabulary).
- `coco/train2017/*.jpg` and `llava/llava_instruct_150k.json`: LLaVA-Instruct-150K's conversation
  records (`<image>` first or last in the first human turn, several turns) on COCO-named JPEGs.
- `coco/val2014/*.jpg`, `pope/data/test-*.parquet`, `mme/data/test-*.parquet`: lmms-lab/POPE's and
  lmms-lab/MME's Parquet releases (images embedded as `{bytes, path}` structs).
- `clip/ViT-L-14.pt`: an open_clip checkpoint file (a state dict), loaded by architecture name +
  path, as `scoring.clip.pretrained=/data/clip/ViT-L-14.pt`.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
OBJECTS = ("bus", "cat", "dog", "car", "clock", "bird")
INSTRUCT_QUESTIONS = ("What is the main object in the image?", "What colour is the {obj}?",
                      "Describe the image briefly.", "Where is the {obj} positioned?")
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@dataclass(frozen=True)
class Release:
    """Where each input lies (docs/llava15.md's /data/... paths, under a test folder)."""

    model: Path
    instruct_json: Path
    train_images: Path
    eval_images: Path
    pope: Path
    mme: Path
    clip_checkpoint: Path


def _scene_image(rng: random.Random, size: tuple[int, int] = (96, 72)) -> tuple[Image.Image, str, str]:
    colour, obj = rng.choice(list(COLOURS)), rng.choice(OBJECTS)
    img = Image.new("RGB", size, (rng.randrange(200, 255),) * 3)
    x, y = rng.randrange(0, size[0] // 2), rng.randrange(0, size[1] // 2)
    ImageDraw.Draw(img).ellipse([x, y, x + size[0] // 2, y + size[1] // 2], fill=COLOURS[colour])
    return img, colour, obj


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_llama_tokenizer(corpus: list[str], vocab_size: int = 600):
    """A Llama tokenizer (transformers' LlamaTokenizer: Metaspace, byte fallback, BOS) whose BPE is
    trained on `corpus`, with LLaVA-1.5's two added tokens: `<image>` then `<pad>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]  # Llama's first 259 ids
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = LlamaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_llava15(directory: Path, corpus: list[str], seed: int = 0) -> None:
    """A randomly initialised LLaVA-1.5 in llava-hf's layout (config, safetensors, processor)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = build_llama_tokenizer(corpus)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def build_clip_checkpoint(path: Path, arch: str) -> None:
    """An open_clip model of `arch`, randomly initialised, saved as a checkpoint file."""
    import open_clip
    import torch

    from m3po_core.scoring.clip import TINY_CLIP, register_tiny_clip

    if arch == TINY_CLIP:
        register_tiny_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)


def write_release(root: Path, *, n_train_images: int = 6, n_eval_images: int = 4, seed: int = 0,
                  clip_arch: str = "ViT-L-14") -> Release:
    rng = random.Random(seed)
    rel = Release(model=root / "llava-1.5-7b-hf", instruct_json=root / "llava/llava_instruct_150k.json",
                  train_images=root / "coco/train2017", eval_images=root / "coco/val2014",
                  pope=root / "pope", mme=root / "mme", clip_checkpoint=root / "clip" / f"{clip_arch}.pt")
    for d in (rel.instruct_json.parent, rel.train_images, rel.eval_images, rel.pope / "data", rel.mme / "data"):
        d.mkdir(parents=True, exist_ok=True)

    # LLaVA-Instruct-150K: conversation records on COCO train2017 names, 1-2 question/answer turns
    records = []
    for i in range(n_train_images):
        img, colour, obj = _scene_image(rng)
        name = f"{100000 + 7 * i:012d}.jpg"
        (rel.train_images / name).write_bytes(_jpeg(img))
        turns = []
        for k, q in enumerate(rng.sample(INSTRUCT_QUESTIONS, 2)):
            q = q.format(obj=obj)
            turns += [{"from": "human", "value": (f"<image>\n{q}" if i % 2 else f"{q}\n<image>") if k == 0 else q},
                      {"from": "gpt", "value": f"The {obj} in the image is {colour}."}]
        records.append({"id": name[:-4], "image": name, "conversations": turns})
    rel.instruct_json.write_text(json.dumps(records))

    # POPE / MME: lmms-lab's Parquet with embedded images on COCO val2014 names
    pope, mme = [], []
    for i in range(n_eval_images):
        img, colour, obj = _scene_image(rng)
        name = f"COCO_val2014_{200000 + 11 * i:012d}.jpg"
        data = _jpeg(img)
        (rel.eval_images / name).write_bytes(data)
        absent = next(o for o in OBJECTS if o != obj)
        for split in ("adversarial", "popular", "random"):
            for o, answer in ((obj, "yes"), (absent, "no")):
                pope.append({"id": str(len(pope)), "question_id": str(len(pope) + 1),
                             "question": f"Is there a {o} in the image?", "answer": answer,
                             "image_source": name[:-4], "image": {"bytes": data, "path": name}, "category": split})
        for sub, (q_yes, q_no) in (("color", (f"Is the {obj} {colour}? Please answer yes or no.",
                                              f"Is the {obj} {'purple'}? Please answer yes or no.")),
                                   ("existence", (f"Is there a {obj} in this image? Please answer yes or no.",
                                                  f"Is there a {absent} in this image? Please answer yes or no."))):
            for q, answer in ((q_yes, "Yes"), (q_no, "No")):
                mme.append({"question_id": f"{sub}/{name[:-4]}.png", "image": {"bytes": data, "path": name},
                            "question": q, "answer": answer, "category": sub})
    for rows, folder, n_files in ((pope, rel.pope, 2), (mme, rel.mme, 1)):
        per_file = -(-len(rows) // n_files)
        for f in range(n_files):
            chunk = rows[f * per_file:(f + 1) * per_file]
            cols = {k: [r[k] for r in chunk] for k in chunk[0]}
            cols["image"] = pa.array(cols["image"], IMAGE_STRUCT)
            pq.write_table(pa.table(cols), folder / "data" / f"test-{f:05d}-of-{n_files:05d}.parquet")

    corpus = [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
    corpus += [r["question"] for r in pope + mme] + ["USER: ASSISTANT: Answer the question using a single word or phrase.",
                                                      "Yes. No. 1. 2. 3. - a b c , ; { } \" :"]
    build_llava15(rel.model, corpus, seed=seed)
    build_clip_checkpoint(rel.clip_checkpoint, clip_arch)
    return rel
