"""LoRA-DPO on the selected pairs through TRL's `DPOTrainer` and PEFT (paper 3.6, 4.1).

The reference model is the base model with the adapters disabled (TRL does this for a PEFT model
when `ref_model=None`), so only one copy of the weights is held.

Tokens: TRL's own vision collator re-tokenises the response *text*; decoding and re-encoding is
not always the identity (BPE merges, leading spaces), so the policy could be trained on tokens
it never sampled. `SampledTokensCollator` instead feeds the prompt exactly as the sampler encoded
it (`models.encode_prompts`) and the completions as the sampler's own token ids, EOS included.

Lengths: no pair is cut. `train_adapter` measures every pair (m3po_core/pair_lengths.py) against
min(training.max_length, the model's context) and refuses or drops those over it
(`training.overlong_pairs`); that limit is TRL's `max_length` (keep_start) and the collator's, so
a cut, which would split the image tokens, never happens to a pair that was let through.

GPU memory: the global batch is training.batch_size, split into per-device micro-batches and
gradient accumulation (`dpo_config`); the split and gradient checkpointing are settings, or `auto`:
decided from the card's free memory once the model is loaded (m3po_core/train_memory.py); after training the
trainer is dropped and the CUDA cache emptied before any vLLM engine is built in the process
(`components.release_training_memory`; docs/llava15.md has the derived peak for 7B and 13B).

`train_adapter` is the whole of it over a run's store: read the pairs and their images, check
their lengths, train, save the adapter (what the train stage and every rank of a distributed run
call). Memory: the pairs stay Arrow (their token ids are never Python lists) and an image is
decoded only for its batch, when measured and when trained on, so host memory does not grow with
the images. Limit: the pairs' table is held whole (Arrow: ~2.4 kB a pair of 150-token answers),
and the lengths are checked after the model is loaded (its context and processor decide them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from m3po_core import progress as terminal
from m3po_core.components import release_engines, resolve_model
from m3po_core.config import RunConfig, TrainingConfig, batch_split
from m3po_core.data.images import load_image
from m3po_core.errors import InputError
from m3po_core.models import encode_prompts
from m3po_core.pair_lengths import check_policy, decide_overlong, effective_max_length, model_context, pair_lengths
from m3po_core.store import RunStore
from m3po_core.train_memory import resolve

log = logging.getLogger("m3po.training")


@dataclass
class SampledTokensCollator:
    """Batches of [chosen..., rejected...] with prompt tokens from the processor and completion
    tokens as sampled; the layout TRL's DPO loss expects (input_ids, attention_mask,
    completion_mask, pixel_values). Cut to `max_length` (keep_start) as TRL's own vision collator
    cuts; `train_adapter` lets no pair through that this would cut."""

    processor: Any
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import flush_left, pad

        # an image reference (the pairs' `image` URL) is decoded here, one batch at a time
        images = [_image(ex) for ex in examples] * 2
        instructions = [ex["instruction"] for ex in examples] * 2
        prompts = encode_prompts(self.processor, images, instructions)
        completions = [list(ex["chosen_token_ids"]) for ex in examples] + \
                      [list(ex["rejected_token_ids"]) for ex in examples]
        pad_id = self.processor.tokenizer.pad_token_id
        comp_ids = pad([torch.tensor(c, dtype=torch.long) for c in completions], padding_value=pad_id)
        comp_mask = pad([torch.ones(len(c), dtype=torch.long) for c in completions], padding_value=0)
        input_ids = torch.cat([prompts["input_ids"], comp_ids], dim=1)
        attention_mask = torch.cat([prompts["attention_mask"], comp_mask], dim=1)
        completion_mask = torch.cat([torch.zeros_like(prompts["attention_mask"]), comp_mask], dim=1)
        attention_mask, input_ids, completion_mask = flush_left(attention_mask, input_ids, completion_mask)
        if self.max_length is not None:
            input_ids, attention_mask, completion_mask = (
                t[:, : self.max_length] for t in (input_ids, attention_mask, completion_mask))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                "pixel_values": prompts["pixel_values"]}


def _image(example: dict[str, Any]) -> Image.Image:
    image = example["images"][0]
    if isinstance(image, str):
        return load_image(image, f"pair of prompt_id {example.get('prompt_id')!r}")
    return image


PAIR_COLUMNS = ["prompt_id", "image", "instruction", "chosen", "rejected", "chosen_token_ids", "rejected_token_ids"]


def pairs_dataset_from_table(table) -> Any:
    """pairs.parquet's rows as a `datasets.Dataset` in TRL's vision preference format, held as Arrow
    (not Python objects) with each image as its reference: `SampledTokensCollator` decodes a batch's
    images when it is drawn, so no more than a batch of images is ever decoded."""
    import pyarrow as pa
    from datasets import Dataset

    from m3po_core.models import prompt_text

    t = table.select(PAIR_COLUMNS)
    images = pa.ListArray.from_arrays(pa.array(range(t.num_rows + 1), pa.int32()), t.column("image").combine_chunks())
    prompts = pa.array([prompt_text(q) for q in t.column("instruction").to_pylist()], pa.string())
    return Dataset(t.drop_columns(["image"]).append_column("images", images).append_column("prompt", prompts))


def pairs_dataset(images: Sequence[Image.Image], instructions: Sequence[str], pairs: Sequence[dict[str, Any]]):
    """A `datasets.Dataset` in TRL's vision preference format (images/prompt/chosen/rejected), plus
    the sampled token ids that `SampledTokensCollator` feeds, from images and rows in memory
    (`train_adapter` uses `pairs_dataset_from_table`)."""
    from datasets import Dataset

    from m3po_core.models import prompt_text

    if not (len(images) == len(instructions) == len(pairs)):
        raise ValueError("images, instructions and pairs must have the same length")
    return Dataset.from_dict({
        "images": [[im] for im in images],
        "instruction": list(instructions),
        "prompt": [prompt_text(q) for q in instructions],
        "chosen": [p["chosen"] for p in pairs],
        "rejected": [p["rejected"] for p in pairs],
        "chosen_token_ids": [list(p["chosen_token_ids"]) for p in pairs],
        "rejected_token_ids": [list(p["rejected_token_ids"]) for p in pairs],
    })


def dpo_config(cfg: TrainingConfig, output_dir: str, max_length: int | None, on_gpu: bool):
    """TRL's `DPOConfig` for `cfg`: the global batch cfg.batch_size = per-device batch x processes x
    gradient accumulation steps (`batch_split`, which refuses a batch that does not divide)."""
    from trl import DPOConfig

    from m3po_core.config import batch_split

    per_device, accumulation = batch_split(cfg)
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,          # TRL/transformers 5: a float < 1 is a ratio of all steps
        num_train_epochs=cfg.epochs,
        lr_scheduler_type="linear",
        beta=cfg.beta,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights else None,
        seed=cfg.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,            # the collator needs the token-id columns
        max_length=max_length,
        truncation_mode="keep_start",           # keep_end would cut the image tokens first
        gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is on; ours is the setting's
        gradient_checkpointing_kwargs={"use_reentrant": False},  # reentrant needs inputs that require grad
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataloader_pin_memory=on_gpu,
        use_cpu=not on_gpu,
    )


def train_lora_dpo(
    model, processor, dataset, cfg: TrainingConfig, output_dir: str,
    log_fn: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Train LoRA adapters with DPO; saves the adapter to `output_dir`; returns TRL's log history
    (plain floats: nothing returned references the model). Sequences are cut at min(cfg.max_length,
    the model's context), the limit `train_adapter` checks the pairs against. On return (or error)
    the trainer, its optimizer and the accelerator's references are dropped and the CUDA cache
    emptied (`components.release_training_memory`); the caller's `model` is theirs to drop."""
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOTrainer

    from m3po_core import components

    max_length = effective_max_length(cfg.max_length, model)
    args = dpo_config(cfg, output_dir, max_length, on_gpu=next(model.parameters()).device.type == "cuda")
    # Adapters on the language model's projections only, as LLaVA's LoRA recipes do: the vision
    # tower has modules of the same names (q_proj, ...) that must stay frozen.
    target = rf".*language_model.*\.({'|'.join(cfg.lora_target_modules)})"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                terminal.steps(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log_fn and logs and "loss" in logs and (state.global_step % 10 == 0 or state.global_step == state.max_steps):
                log_fn(f"DPO step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                       f"reward acc {logs.get('rewards/accuracies', float('nan')):.2f}")

    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset,
                         processing_class=processor, peft_config=lora,
                         data_collator=SampledTokensCollator(processor, max_length), callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # progress goes through log_fn, not print()
    try:
        trainer.train()
        if trainer.accelerator.is_main_process:  # under DDP every rank holds the same adapter
            trainer.model.save_pretrained(output_dir)
        return [dict(h) for h in trainer.state.log_history]
    finally:
        # an engine built next in this process needs the GPU back (evaluation, IPA's next round,
        # the next experiment cell): the accelerator holds the model, optimizer and scheduler too
        trainer.accelerator.free_memory()
        del trainer
        components.release_training_memory()


def train_adapter(cfg: RunConfig, store: RunStore, model_ref: str, output_dir: str,
                  log_fn: Callable[[str], None] = log.info, pairs_rel: str = "pairs.parquet") -> dict[str, Any]:
    """Read the pairs and their images, check their lengths, train, save the adapter to
    `output_dir` (every rank of a distributed run calls this; the trainer shards the data and rank
    0 saves). Returns {"history": TRL's log history, "max_length": the limit trained under (None:
    none), "dropped_overlong_pairs": pairs left out by training.overlong_pairs=drop}."""
    from m3po_core.models import load_vlm

    release_engines()  # a vLLM engine holds most of the GPU: training on the same GPU needs it back
    import pyarrow.compute as pc

    where = store.url(pairs_rel)
    table = store.read_table(pairs_rel, PAIR_COLUMNS)  # Arrow: token ids are not made Python objects
    if not table.num_rows:
        raise InputError(f"{where}: no preference pairs to train on")
    lengths = {side: pc.fill_null(pc.list_value_length(table.column(f"{side}_token_ids")), 0).to_numpy()
               for side in ("chosen", "rejected")}
    empty = [i for i in range(table.num_rows) if not lengths["chosen"][i] or not lengths["rejected"][i]]
    if empty:  # e.g. a server that ignored return_tokens_as_token_ids: DPO would learn nothing
        raise InputError(f"{where} rows {empty[:10]}: responses without sampled token ids")
    model, processor = load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype)  # own copy: LoRA is injected
    check_policy(cfg.training.overlong_pairs)
    limit = effective_max_length(cfg.training.max_length, model)
    dropped = 0
    if limit is not None:
        measured: list[int] = []
        for offset, batch in _row_batches(table, ["prompt_id", "image", "instruction"]):  # one batch of images at a time
            images = [load_image(r["image"], f"{pairs_rel} row {offset + i}, prompt_id {r['prompt_id']!r}")
                      for i, r in enumerate(batch)]
            rows = [{"chosen_token_ids": range(lengths["chosen"][offset + i]),
                     "rejected_token_ids": range(lengths["rejected"][offset + i])} for i in range(len(batch))]
            measured += pair_lengths(processor, images, [r["instruction"] for r in batch], rows, len(batch))
        keep = decide_overlong(measured, table.column("prompt_id").to_pylist(), limit, cfg.training.max_length,
                               model_context(model), cfg.training.overlong_pairs, where, log_fn)
        dropped = table.num_rows - len(keep)
        if dropped:
            table = table.take(keep)
        longest = max((measured[i] for i in keep), default=0)
    else:
        longest = int(max(lengths["chosen"].max(), lengths["rejected"].max())) + 1024  # prompt not measured
    training, memory = resolve(cfg.training, model, longest)  # the auto settings, from the device's free memory
    dataset = pairs_dataset_from_table(table)
    history = train_lora_dpo(model, processor, dataset, training, output_dir, log_fn=log_fn)
    per_device, accumulation = batch_split(training)
    return {"history": history, "max_length": limit, "dropped_overlong_pairs": dropped,
            "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
            "gradient_checkpointing": training.gradient_checkpointing,
            "memory": {"free_gib": memory.free_gib, "pair_gib": memory.pair_gib, "longest_pair_tokens": longest,
                       "reason": memory.reason}}


def _row_batches(table, columns: list[str], size: int = 32):
    """(offset, rows) of `columns`, `size` rows at a time."""
    for offset in range(0, table.num_rows, size):
        yield offset, table.slice(offset, size).select(columns).to_pylist()
