"""`training.per_device_batch_size: auto` and `training.gradient_checkpointing: auto`, decided from
the card's free memory and a measured cost per pair, keeping the global batch.

The cost of a pair (its chosen and rejected sequences through the policy's forward and backward,
and the reference's forward) grows with its tokens, the language model's layers and width, and the
element size. Measured on one H200 at LLaVA-1.5-7B shapes (bf16, pairs of ~737 tokens, issue 28,
../shared/gpu): peak 33.0 GiB at 2 pairs a device and 89.7 GiB at 8 without checkpointing (9.45 GiB
a pair over a 14.1 GiB base), 15.7 GiB at 2 with it (0.8 GiB a pair). In units of tokens x layers
x hidden size x element size, a pair costs 26.3 of them without checkpointing and 2.22 with it;
`training.pair_memory_gib` replaces that estimate with a figure measured on your card
(bench/gpu_check.py prints it).

The rule: the largest micro-batch (a divisor of the global batch per process) whose pairs fit in
80 % of the free memory without checkpointing, if it holds at least 2 pairs (measured: 2 x 4
without checkpointing 1.92 s a step, with it 2.84 s; 8 x 1 without 1.65 s); else checkpointing
with the largest micro-batch that fits. At 7B and answers up to 256 tokens that is 8 pairs without
checkpointing on a 141 GB card, 4 without on an 80 GB one, 8 with it on a 40 GB one. On a CPU
(free memory unknown): the whole per-process batch, no checkpointing.

Limit: under `training.num_processes` > 1 each rank decides from its own card: use identical cards.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from m3po_core.config import TrainingConfig
from m3po_core.errors import InputError

log = logging.getLogger("m3po.training")

PAIR_UNITS = {False: 26.3, True: 2.22}   # bytes per (token x layer x hidden x element size), H200 7B
HEADROOM = 0.8
SLACK_GIB = 0.9                         # LoRA weights, their gradients and Adam's moments, allocator slack at 7B


@dataclass(frozen=True)
class MemoryChoice:
    per_device_batch_size: int
    gradient_checkpointing: bool
    pair_gib: float           # the cost per pair the choice assumed
    free_gib: float | None    # what was free when it was made (None: a CPU)
    reason: str


def pair_gib(tokens: int, layers: int, hidden: int, element_size: int, checkpointing: bool) -> float:
    """Estimated memory of one pair of `tokens`-token sequences in training, in GiB."""
    return PAIR_UNITS[checkpointing] * 2 * tokens * layers * hidden * element_size / 2**30


def choose(cfg: TrainingConfig, free_gib: float | None, tokens: int, layers: int, hidden: int,
           element_size: int) -> MemoryChoice:
    """Resolve the `auto` settings of `cfg` (a fixed setting is kept as it is)."""
    per_process = cfg.batch_size // cfg.num_processes
    setting = cfg.per_device_batch_size
    fixed_b = None if setting == "auto" else (per_process if setting is None else setting)
    fixed_gc = None if cfg.gradient_checkpointing == "auto" else bool(cfg.gradient_checkpointing)
    if free_gib is None:
        return MemoryChoice(fixed_b or per_process, bool(fixed_gc), 0.0, None, "no device memory to size against (CPU)")

    def cost(gc: bool) -> float:
        return cfg.pair_memory_gib if cfg.pair_memory_gib is not None else pair_gib(tokens, layers, hidden,
                                                                                    element_size, gc)

    budget = HEADROOM * free_gib - SLACK_GIB
    sizes = [fixed_b] if fixed_b else [d for d in range(per_process, 0, -1) if per_process % d == 0]

    def largest(gc: bool) -> int | None:
        return next((b for b in sizes if b * cost(gc) <= budget), None)

    if fixed_gc is not None:
        b = largest(fixed_gc)
        if b is None:
            b = sizes[-1]
            log.warning("training: %d pair(s) a device need ~%.1f GiB, %.1f GiB free", b, b * cost(fixed_gc), free_gib)
        return MemoryChoice(b, fixed_gc, cost(fixed_gc), free_gib, "checkpointing as set")
    plain = largest(False)
    if plain is not None and plain >= min(2, per_process):
        return MemoryChoice(plain, False, cost(False), free_gib,
                            f"{plain} pair(s) of ~{cost(False):.2f} GiB fit {HEADROOM:.0%} of {free_gib:.1f} GiB free")
    checkpointed = largest(True)
    if checkpointed is None:
        raise InputError(f"training: one pair of {tokens} tokens needs ~{cost(True):.2f} GiB even with gradient "
                         f"checkpointing; {free_gib:.1f} GiB are free on the device (lower training.max_length or "
                         "the answers' length, or use a larger card)")
    return MemoryChoice(checkpointed, True, cost(True), free_gib,
                        f"without checkpointing {plain or 0} pair(s) fit; with it {checkpointed} of ~{cost(True):.2f} GiB")


def resolve(cfg: TrainingConfig, model, tokens: int) -> tuple[TrainingConfig, MemoryChoice]:
    """`cfg` with concrete per-device batch and checkpointing for `model` (loaded, on its device) and
    pairs of at most `tokens` tokens."""
    import torch

    device = next(model.parameters()).device
    free = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0] / 2**30
    text = model.config.get_text_config()
    choice = choose(cfg, free, tokens, text.num_hidden_layers, text.hidden_size, next(model.parameters()).element_size())
    if "auto" not in (cfg.per_device_batch_size, cfg.gradient_checkpointing):
        return cfg, choice
    log.info("training: %d pair(s) a device, gradient checkpointing %s (%s)", choice.per_device_batch_size,
                 "on" if choice.gradient_checkpointing else "off", choice.reason)
    return dataclasses.replace(cfg, per_device_batch_size=choice.per_device_batch_size,
                               gradient_checkpointing=choice.gradient_checkpointing), choice
