"""LoRA-DPO through TRL on a tiny LLaVA: the tokens trained on are the tokens sampled."""
import torch

from m3po_core.config import TrainingConfig
from m3po_core.models import encode_prompts
from m3po_core.sampling import SamplingParams
from m3po_core.sampling.transformers_backend import TransformersSampler
from m3po_core.training import pairs_dataset, SampledTokensCollator, train_lora_dpo


def sampled_pairs(model, processor, images, instructions):
    cands = TransformersSampler(model, processor).sample(
        images, instructions, SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=10), seed=1)
    return [{"chosen": c[0].text, "rejected": c[1].text, "chosen_token_ids": c[0].token_ids,
             "rejected_token_ids": c[1].token_ids} for c in cands]


def test_collator_feeds_exactly_the_sampled_tokens(tiny_vlm, world_batch):
    model, processor = tiny_vlm
    images, instructions = world_batch
    pairs = sampled_pairs(model, processor, images[:3], instructions[:3])
    ds = pairs_dataset(images[:3], instructions[:3], pairs)
    batch = SampledTokensCollator(processor)([ds[i] for i in range(3)])
    prompts = encode_prompts(processor, images[:3], instructions[:3])
    for row in range(6):  # rows 0-2 chosen, 3-5 rejected
        pair = pairs[row % 3]
        want = pair["chosen_token_ids"] if row < 3 else pair["rejected_token_ids"]
        ids, comp = batch["input_ids"][row], batch["completion_mask"][row].bool()
        assert ids[comp].tolist() == want
        prompt_ids = prompts["input_ids"][row % 3][prompts["attention_mask"][row % 3].bool()]
        att = batch["attention_mask"][row].bool()
        assert ids[att & ~comp].tolist() == prompt_ids.tolist()
    assert batch["pixel_values"].shape[0] == 6


def test_lora_dpo_trains_adapters_only_and_saves_them(tiny_vlm, world_batch, tmp_path):
    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tiny_llava

    model, processor = build_tiny_llava(world.vocabulary(), seed=0)  # own copy: LoRA is injected in place
    images, instructions = world_batch
    pairs = sampled_pairs(model, processor, images, instructions)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_lora_dpo(model, processor, pairs_dataset(images, instructions, pairs),
                             TrainingConfig(learning_rate=1e-2, batch_size=2), str(tmp_path))
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3                                     # 6 pairs / batch 2, one epoch
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    # base weights untouched (the reference is the base model with adapters disabled)
    base = model.state_dict()  # PEFT injected the LoRA layers into this very module
    for k, v in before.items():
        key = k.replace(".weight", ".base_layer.weight") if k not in base else k
        assert torch.equal(base[key], v), k
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all("language_model" in n for n, _ in model.named_parameters() if "lora_" in n)
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)   # B starts at zero: it moved


def test_pairs_from_the_store_are_decoded_per_batch_not_up_front(tiny_vlm, world_batch, tmp_path):
    """train_adapter's dataset holds each pair's image as its reference (Arrow rows, no decoded
    images); the collator decodes a batch's images when it is drawn, and gives the very batch that
    in-memory images give."""
    import pyarrow as pa

    from m3po_core.training import pairs_dataset_from_table

    model, processor = tiny_vlm
    images, instructions = world_batch
    pairs = sampled_pairs(model, processor, images[:3], instructions[:3])
    paths = []
    for i, image in enumerate(images[:3]):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    table = pa.Table.from_pylist([{"prompt_id": f"p{i}", "image": paths[i], "instruction": instructions[i], **p}
                                  for i, p in enumerate(pairs)])
    lazy = pairs_dataset_from_table(table)
    assert lazy[1]["images"] == [paths[1]] and lazy[1]["prompt_id"] == "p1"      # a reference, not pixels
    collate = SampledTokensCollator(processor)
    got = collate([lazy[i] for i in range(3)])
    want = collate([pairs_dataset(images[:3], instructions[:3], pairs)[i] for i in range(3)])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    (tmp_path / "2.png").unlink()  # a missing image fails when its batch is drawn, naming its prompt
    import pytest

    from m3po_core.errors import InputError
    with pytest.raises(InputError, match="p2"):
        collate([lazy[2]])
