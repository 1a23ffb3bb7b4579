"""`m3po export`: each format read back by the library that reads it (no project code on the
reading side), and trained on with TRL's `DPOTrainer` through TRL's own vision collator."""
import glob
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3po_core.errors import ArgumentError
from m3po_core.export import export_pairs
from m3po_core.pair_query import PairFilter
from m3po_core.store import RunStore

pytestmark = pytest.mark.slow

# LLaVA-1.5's conversation layout ("USER: <image>\n... ASSISTANT: ..."), as a chat template: the
# carried tiny processor has none, and TRL's collator applies the processor's template
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                  "{% if m['role'] == 'user' %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def export(mined_run, tmp_path, fmt: str, *flags: str) -> Path:
    root, run_id = mined_run
    out = tmp_path / fmt
    done = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "export", run_id, "--root", root,
                           "--format", fmt, "--out", str(out), *flags], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def pairs_of(mined_run) -> list[dict]:
    root, run_id = mined_run
    return pq.read_table(Path(root, run_id, "pairs.parquet")).to_pylist()


def test_the_trl_export_trains_with_dpo_trainer(mined_run, tmp_path):
    out = export(mined_run, tmp_path, "trl")
    # the reading side: datasets, transformers, TRL and PEFT only
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    ds = load_dataset("parquet", data_dir=str(out / "data"), split="train")
    pairs = pairs_of(mined_run)
    assert len(ds) == len(pairs) and sorted(ds["prompt_id"]) == sorted(p["prompt_id"] for p in pairs)
    row = ds[0]
    assert row["images"][0].size == (64, 64)  # decoded as an image
    assert row["prompt"][0]["role"] == "user" and [c["type"] for c in row["prompt"][0]["content"]] == ["image", "text"]
    source = next(p for p in pairs if p["prompt_id"] == row["prompt_id"])
    assert row["chosen"][0]["content"][0]["text"] == source["chosen"]
    assert row["rejected"][0]["content"][0]["text"] == source["rejected"]

    model_dir = glob.glob(str(Path(mined_run[0]) / "_models" / "tiny-llava-*"))[0]
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.chat_template = LLAVA_TEMPLATE
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
                     report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds.select(range(16)), processing_class=processor,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter moved off its zero start


def test_the_datasets_folder_loads_from_disk(mined_run, tmp_path):
    from datasets import Image, List, load_from_disk

    out = export(mined_run, tmp_path, "hf-dataset")
    ds = load_from_disk(str(out))
    pairs = {p["prompt_id"]: p for p in pairs_of(mined_run)}
    assert len(ds) == len(pairs)
    raw = ds.cast_column("images", List(Image(decode=False)))  # the stored bytes, undecoded
    for i in range(0, len(ds), max(1, len(ds) // 10)):
        row, p = ds[i], pairs[ds[i]["prompt_id"]]
        assert row["prompt"][0]["content"][1]["text"] == p["instruction"]
        assert (row["mas_chosen"], row["m3p_score"], row["chosen_idx"]) == (p["mas_chosen"], p["m3p_score"], p["chosen_idx"])
        assert raw[i]["images"][0]["bytes"] == Path(p["image"]).read_bytes()  # the image's own bytes
        assert row["images"][0].size == (64, 64)


def test_the_llamafactory_export_follows_its_documented_schema(mined_run, tmp_path):
    out = export(mined_run, tmp_path, "llamafactory", "--kind", "colour")
    info = json.loads((out / "dataset_info.json").read_text())
    (name, entry), = info.items()
    assert entry["formatting"] == "sharegpt" and entry["ranking"] is True
    rows = json.loads((out / entry["file_name"]).read_text())
    cols, tags = entry["columns"], entry["tags"]
    pairs = {p["prompt_id"]: p for p in pairs_of(mined_run)}
    root, run_id = mined_run
    kinds = {r["prompt_id"]: r["kind"] for r in RunStore(root, run_id).read_stage("prompts").to_pylist()}
    assert rows and len(rows) == sum(1 for k in pairs if kinds[k] == "colour")
    for row in rows:
        turns = row[cols["messages"]]
        assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"]]  # one human turn, odd position
        for side in ("chosen", "rejected"):
            assert row[cols[side]][tags["role_tag"]] == tags["assistant_tag"]
        # LLaMA-Factory requires as many <image> tokens in the messages as images listed
        assert sum(t[tags["content_tag"]].count("<image>") for t in turns) == len(row[cols["images"]]) == 1
        image = out / row[cols["images"]][0]
        assert image.is_file() and image.read_bytes() == Path(pairs[row["prompt_id"]]["image"]).read_bytes()
        p = pairs[row["prompt_id"]]
        assert turns[0]["value"] == "<image>" + p["instruction"]
        assert (row["chosen"]["value"], row["rejected"]["value"]) == (p["chosen"], p["rejected"])


def test_an_export_refuses_a_used_folder_and_leaves_nothing_half_written(mined_run, tmp_path):
    root, run_id = mined_run
    store = RunStore(root, run_id)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ArgumentError, match="not an empty directory"):
        export_pairs(store, "trl", used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]

    out = tmp_path / "fresh"
    with pytest.raises(Exception, match="no pair passes"):
        export_pairs(store, "llamafactory", out, PairFilter(min_m3p=1e9))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["used"]  # no work folder left

    bad = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "export", run_id, "--root", root, "--format", "trl",
                          "--out", str(out), "--min-mas-gap", "wide"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "min_mas_gap='wide' is not a number" in bad.stderr and not out.exists()


def test_an_image_changed_since_the_prompts_stage_is_not_exported(mined_run, tmp_path):
    root, run_id = mined_run
    pair = pairs_of(mined_run)[0]
    image = Path(pair["image"])
    good = image.read_bytes()
    image.write_bytes(good + b"\0")  # other bytes than the pair was mined on
    try:
        with pytest.raises(Exception, match="changed after the prompts stage read it"):
            export_pairs(RunStore(root, run_id), "llamafactory", tmp_path / "out")
    finally:
        image.write_bytes(good)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
