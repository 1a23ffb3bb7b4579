"""The length guard of DPO training on a tiny LLaVA: pairs over the limit are refused (named) or
dropped (counted), never cut; the guard's length is the collator's batch length."""
from pathlib import Path

import pyarrow as pa
import pytest

from m3po_core import schema
from m3po_core.config import load_config
from m3po_core.errors import ConfigError, InputError
from m3po_core.models import completion_ids
from m3po_core.pair_lengths import effective_max_length, pair_lengths
from m3po_core.store import RunStore
from m3po_core.training import SampledTokensCollator, pairs_dataset, train_adapter

TINY = Path(__file__).parent / "tiny.yaml"
LONG_ROW = 2


def make_pairs(processor, instructions, long_row=None, long_tokens=60):
    """Short sampled-like pairs (EOS included); `long_row`'s rejected answer is `long_tokens` words."""
    pairs = []
    for i, q in enumerate(instructions):
        rejected = " ".join(["red"] * long_tokens) if i == long_row else "no"
        pairs.append({"prompt_id": f"p{i}", "instruction": q, "chosen": "yes", "rejected": rejected,
                      "chosen_token_ids": completion_ids(processor, "yes", add_eos=True),
                      "rejected_token_ids": completion_ids(processor, rejected, add_eos=True)})
    return pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vlm, world_batch):
    """A store whose pairs.parquet holds six pairs, row 2 with a long rejected answer, and the tiny
    model saved where train_adapter loads it."""
    from m3po_core.models import save_vlm

    model, processor = tiny_vlm
    images, instructions = world_batch
    root = tmp_path_factory.mktemp("lengths")
    save_vlm(model, processor, str(root / "model"))
    rows = []
    for i, p in enumerate(make_pairs(processor, instructions, long_row=LONG_ROW)):
        path = root / f"img{i}.png"
        images[i].save(path)
        rows.append({**p, "image": str(path), "chosen_idx": 0, "rejected_idx": 1, "mas_chosen": 1.0,
                     "mas_rejected": 0.0, "logp_chosen": -1.0, "logp_rejected": -2.0, "m3p_score": 1.0,
                     "strategy": "m3po"})
    store = RunStore(str(root), "r")
    store.write_table("pairs.parquet", pa.Table.from_pylist(rows, schema=schema.PAIRS), schema.PAIRS)
    lengths = pair_lengths(processor, images, instructions, rows)
    return store, str(root / "model"), lengths


def config(*overrides):
    return load_config(TINY, ["model.device=cpu", "training.batch_size=2", *overrides])


def test_guard_length_is_the_collators_batch_length(tiny_vlm, world_batch):
    model, processor = tiny_vlm
    images, instructions = world_batch
    pairs = make_pairs(processor, instructions, long_row=1, long_tokens=7)
    pairs[3]["chosen_token_ids"] = pairs[3]["chosen_token_ids"] * 3   # the longer completion is the chosen one
    lengths = pair_lengths(processor, images, instructions, pairs, batch_size=4)  # two batches of prompts
    ds = pairs_dataset(images, instructions, pairs)
    collate = SampledTokensCollator(processor)
    for i in range(len(pairs)):
        assert collate([ds[i]])["input_ids"].shape[1] == lengths[i]
    assert collate([ds[i] for i in range(len(pairs))])["input_ids"].shape[1] == max(lengths)
    # at a limit of exactly a pair's length the collator's cut leaves it whole
    batch = SampledTokensCollator(processor, max_length=lengths[1])([ds[1]])
    assert batch["input_ids"].tolist() == collate([ds[1]])["input_ids"].tolist()
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens > 0 and lengths[1] > image_tokens


def test_the_limit_is_the_smaller_of_max_length_and_the_context(tiny_vlm):
    model, _ = tiny_vlm
    context = model.config.get_text_config().max_position_embeddings
    assert effective_max_length(None, model) == context
    assert effective_max_length(context + 100, model) == context
    assert effective_max_length(40, model) == 40


def test_an_overlong_pair_is_refused_by_row_and_prompt_id(run, tmp_path):
    store, model_ref, lengths = run
    limit = max(n for i, n in enumerate(lengths) if i != LONG_ROW)
    assert lengths[LONG_ROW] > limit
    with pytest.raises(InputError) as e:
        train_adapter(config(f"training.max_length={limit}"), store, model_ref, str(tmp_path))
    msg = str(e.value)
    assert "pairs.parquet" in msg and "1 of 6 pairs" in msg and f"limit of {limit} tokens" in msg
    assert f"row {LONG_ROW} (prompt_id 'p{LONG_ROW}', {lengths[LONG_ROW]} tokens)" in msg
    assert "training.overlong_pairs" in msg
    assert not any(tmp_path.iterdir())   # refused before training: no adapter


def test_an_overlong_pair_is_dropped_counted_and_the_rest_trained(run):
    from m3po_core.stages import train as train_step

    store, model_ref, lengths = run
    limit = max(n for i, n in enumerate(lengths) if i != LONG_ROW)
    store.write_json("pairs_stats.json", {"sha256": "test", "pairs": 6})
    lines = []
    result = train_step.train(config(f"training.max_length={limit}", "training.overlong_pairs=drop"),
                              store, model_ref, log_fn=lines.append)
    assert result["dropped_overlong_pairs"] == 1 and result["max_length"] == limit
    assert store.read_json("train_log.json")["dropped_overlong_pairs"] == 1
    assert any(f"dropped 1 of 6 pairs longer than {limit} tokens" in line for line in lines)
    assert len([h for h in result["history"] if "loss" in h]) == 3    # 5 pairs left / batch 2
    assert store.dir_complete("adapter")


def test_a_limit_below_the_image_tokens_refuses_every_pair(run, tmp_path, tiny_vlm, world_batch):
    from m3po_core.models import encode_prompts

    store, model_ref, _ = run
    model, processor = tiny_vlm
    prompt = encode_prompts(processor, world_batch[0][:1], world_batch[1][:1])["input_ids"]
    limit = (prompt == model.config.image_token_id).sum().item() - 1   # a cut inside the image tokens
    with pytest.raises(InputError, match=f"6 of 6 pairs are longer than the limit of {limit} tokens") as e:
        train_adapter(config(f"training.max_length={limit}"), store, model_ref, str(tmp_path))
    assert all(f"row {i} (prompt_id 'p{i}'" in str(e.value) for i in range(6))
    with pytest.raises(InputError, match="leaves no pair to train on"):
        train_adapter(config(f"training.max_length={limit}", "training.overlong_pairs=drop"), store, model_ref,
                      str(tmp_path))


def test_the_length_settings_are_checked():
    assert config().training.max_length is None and config().training.overlong_pairs == "refuse"
    with pytest.raises(ConfigError, match="training.overlong_pairs"):
        config("training.overlong_pairs=skip")
    with pytest.raises(ConfigError, match="training.max_length"):
        config("training.max_length=0")


def test_without_max_length_the_models_context_is_the_limit(tiny_vlm, world_batch):
    from m3po_core.pair_lengths import guard_pairs

    model, processor = tiny_vlm
    images, instructions = world_batch
    context = model.config.get_text_config().max_position_embeddings
    pairs = make_pairs(processor, instructions, long_row=0, long_tokens=context)
    with pytest.raises(InputError, match=rf"limit of {context} tokens \(the model's context \({context} tokens\)") as e:
        guard_pairs(processor, model, images, pairs, max_length=None, policy="refuse", where="pairs.parquet")
    assert "row 0 (prompt_id 'p0'" in str(e.value) and "raise training.max_length" not in str(e.value)
    keep, limit = guard_pairs(processor, model, images, pairs, max_length=None, policy="drop", where="pairs.parquet")
    assert keep == [1, 2, 3, 4, 5] and limit == context


def test_ranks_of_a_distributed_run_drop_alike_and_rank_0_reports_the_count(run, tmp_path):
    """training.num_processes=2 (two gloo ranks on this CPU): the count reaches train_log.json."""
    import shutil

    from m3po_core.stages import train as train_step

    store, model_ref, lengths = run
    ddp = RunStore(store.root, "r-ddp")
    shutil.copytree(store.path(""), ddp.path(""), dirs_exist_ok=True)
    shutil.rmtree(ddp.path("adapter"), ignore_errors=True)
    ddp.write_json("pairs_stats.json", {"sha256": "test-ddp", "pairs": 6})
    limit = max(n for i, n in enumerate(lengths) if i != LONG_ROW)
    lines = []
    result = train_step.train(config(f"training.max_length={limit}", "training.overlong_pairs=drop",
                                     "training.num_processes=2"), ddp, model_ref, log_fn=lines.append)
    assert result["num_processes"] == 2 and result["dropped_overlong_pairs"] == 1
    assert ddp.read_json("train_log.json")["dropped_overlong_pairs"] == 1
    assert any("dropped 1 of 6 pairs" in line for line in lines)
    assert any("loss" in h for h in result["history"]) and ddp.dir_complete("adapter")
