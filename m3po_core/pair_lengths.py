"""The length guard of DPO training: no pair is cut, so no image token is cut.

A pair's sequence is its prompt as `SampledTokensCollator` encodes it (`models.encode_prompts`:
the image placeholder expanded to the image tokens, special tokens included) followed by the
longer of its two sampled completions. TRL cuts batches to `max_length` (keep_start); a cut
through the image tokens fails deep in the forward pass ("Image features and image tokens do not
match", TRL issues #5283, #5285), and a cut completion trains on a response never sampled. So
every pair is measured before training against the limit, min(training.max_length, the model's
context), and the pairs over it are refused (an InputError naming them) or dropped and counted
(`training.overlong_pairs`).

Limit: the prompts are encoded once more (image preprocessing included) in batches of
`batch_size`; only the lengths are kept. The lengths hold for one processor: a different
processor at training time than the one measured with is not seen.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from PIL import Image

from m3po_core.errors import ConfigError, InputError

OVERLONG_POLICIES = ("refuse", "drop")


def model_context(model) -> int | None:
    """The language model's context length (its text config's `max_position_embeddings`)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def effective_max_length(max_length: int | None, model) -> int | None:
    """min(training.max_length, the model's context); None where neither is known."""
    limits = [n for n in (max_length, model_context(model)) if n is not None]
    return min(limits) if limits else None


def pair_lengths(processor, images: Sequence[Image.Image], instructions: Sequence[str],
                 pairs: Sequence[dict[str, Any]], batch_size: int = 32) -> list[int]:
    """Per pair: prompt tokens (image tokens expanded, as the collator encodes them) + the longer
    completion: the row length of its chosen/rejected rows in a batch of its own."""
    from m3po_core.models import encode_prompts

    if not (len(images) == len(instructions) == len(pairs)):
        raise ValueError("images, instructions and pairs must have the same length")
    lengths: list[int] = []
    for start in range(0, len(pairs), batch_size):
        stop = start + batch_size
        enc = encode_prompts(processor, images[start:stop], instructions[start:stop])
        prompt = enc["attention_mask"].sum(dim=1).tolist()   # left padding is masked out
        del enc                                             # pixel values: not needed past here
        lengths += [n + max(len(p["chosen_token_ids"]), len(p["rejected_token_ids"]))
                    for n, p in zip(prompt, pairs[start:stop])]
    return lengths


def overlong_rows(lengths: Sequence[int], limit: int | None) -> list[int]:
    """Rows whose sequence would be cut at `limit` (TRL keeps `[:limit]`: a length of limit fits)."""
    return [] if limit is None else [i for i, n in enumerate(lengths) if n > limit]


def guard_pairs(processor, model, images: Sequence[Image.Image], pairs: Sequence[dict[str, Any]], *,
                max_length: int | None, policy: str, where: str,
                log_fn: Callable[[str], None] | None = None, batch_size: int = 32) -> tuple[list[int], int | None]:
    """The rows of `pairs` to train on and the effective limit (`decide_overlong`), with every
    pair's image and rows in memory; `train_adapter` measures batch by batch instead."""
    check_policy(policy)
    limit = effective_max_length(max_length, model)
    if limit is None:
        return list(range(len(pairs))), None
    lengths = pair_lengths(processor, images, [p["instruction"] for p in pairs], pairs, batch_size)
    keep = decide_overlong(lengths, [p.get("prompt_id") for p in pairs], limit, max_length, model_context(model),
                           policy, where, log_fn)
    return keep, limit


def check_policy(policy: str) -> None:
    if policy not in OVERLONG_POLICIES:
        raise ConfigError(f"configuration key 'training.overlong_pairs': {policy!r} is not one of "
                          f"{list(OVERLONG_POLICIES)}")


def decide_overlong(lengths: Sequence[int], prompt_ids: Sequence[Any], limit: int, max_length: int | None,
                    context: int | None, policy: str, where: str,
                    log_fn: Callable[[str], None] | None = None) -> list[int]:
    """The rows to train on. `policy` "refuse": an InputError naming the overlong pairs (row,
    prompt_id, length; first ten, and their count); "drop": they are left out (logged). No pair
    left is an InputError either way. `where` names the pairs' file in messages."""
    check_policy(policy)
    over = overlong_rows(lengths, limit)
    if not over:
        return list(range(len(lengths)))
    source = (f"training.max_length={max_length}" if max_length is not None and (context is None or max_length <= context)
              else f"the model's context ({context} tokens)")
    named = ", ".join(f"row {i} (prompt_id {prompt_ids[i]!r}, {lengths[i]} tokens)" for i in over[:10])
    more = f" and {len(over) - 10} more" if len(over) > 10 else ""
    what = (f"{where}: {len(over)} of {len(lengths)} pairs are longer than the limit of {limit} tokens ({source}; "
            f"prompt with its image tokens + the longer completion): {named}{more}")
    if policy == "refuse":
        fix = ("raise training.max_length (up to the model's context) or " if source.startswith("training") else "")
        raise InputError(f"{what}. Training would cut them: a cut completion, or image tokens left without their "
                         f"image features; {fix}set training.overlong_pairs: drop to leave them out")
    keep = [i for i in range(len(lengths)) if lengths[i] <= limit]
    if not keep:
        raise InputError(f"{what}. training.overlong_pairs=drop leaves no pair to train on")
    if log_fn:
        log_fn(f"dropped {len(over)} of {len(lengths)} pairs longer than {limit} tokens ({source})")
    return keep
