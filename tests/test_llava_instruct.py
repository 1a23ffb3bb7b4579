import json
from pathlib import Path

import pytest
from PIL import Image

from m3po_core.data.llava_instruct import check_images, load_llava_instruct
from m3po_core.errors import InputError

RECORDS = [
    {
        "id": "000000033471",
        "image": "000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "An advertisement."},
        ],
    },
    {
        "id": "000000052846",
        "image": "000000052846.jpg",
        "conversations": [
            {"from": "human", "value": "Where is the cat positioned?\n<image>"},
            {"from": "gpt", "value": "On a bed."},
        ],
    },
]


def _write(tmp_path: Path, content: object, name: str = "llava.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.fixture
def image_root(tmp_path: Path) -> str:
    root = tmp_path / "images"
    root.mkdir()
    for record in RECORDS:
        Image.new("RGB", (4, 4), (255, 0, 0)).save(root / record["image"], format="PNG")
    return str(root)


def test_first_turns(tmp_path, image_root):
    prompts = load_llava_instruct(_write(tmp_path, RECORDS), image_root)
    assert prompts == [
        {
            "prompt_id": "000000033471-t0",
            "image": f"{image_root}/000000033471.jpg",
            "instruction": "What are the colors of the bus in the image?",
            "reference": "The bus in the image is white and red.",
            "source": "llava_instruct",
            "kind": "open",
            "scene": None,
        },
        {
            "prompt_id": "000000052846-t0",
            "image": f"{image_root}/000000052846.jpg",
            "instruction": "Where is the cat positioned?",
            "reference": "On a bed.",
            "source": "llava_instruct",
            "kind": "open",
            "scene": None,
        },
    ]
    check_images(prompts)


def test_all_turns_and_max_prompts(tmp_path, image_root):
    path = _write(tmp_path, RECORDS)
    prompts = load_llava_instruct(path, image_root + "/", turns="all")
    assert [p["prompt_id"] for p in prompts] == [
        "000000033471-t0",
        "000000033471-t1",
        "000000052846-t0",
    ]
    assert prompts[1]["instruction"] == "What feature can be seen on the back of the bus?"
    assert prompts[1]["reference"] == "An advertisement."
    assert prompts[1]["image"] == f"{image_root}/000000033471.jpg"
    assert len(load_llava_instruct(path, image_root, turns="all", max_prompts=2)) == 2


def test_missing_image_names_path_and_prompt(tmp_path, image_root):
    prompts = load_llava_instruct(_write(tmp_path, RECORDS), image_root)
    (Path(image_root) / "000000052846.jpg").unlink()
    with pytest.raises(InputError, match="000000052846.jpg.*000000052846-t0"):
        check_images(prompts)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.json"):
        load_llava_instruct(str(tmp_path / "nope.json"), "images")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"id": "1"}, "JSON list"),
        (
            [RECORDS[0], {"id": "x9", "conversations": RECORDS[1]["conversations"]}],
            r"record 1 .*x9.*'image'",
        ),
        ([{"id": "x0", "image": "a.jpg"}], r"record 0 .*'conversations'"),
        (
            [{"id": "x0", "image": "a.jpg", "conversations": RECORDS[0]["conversations"][1:]}],
            r"record 0 .*human",
        ),
        (
            [
                RECORDS[0],
                {
                    "id": "x5",
                    "image": "a.jpg",
                    "conversations": [
                        {"from": "human", "value": " <image>\n "},
                        {"from": "gpt", "value": "Yes."},
                    ],
                },
            ],
            r"record 1 .*x5.*conversations\[0\]\.value",
        ),
    ],
)
def test_bad_input_names_file_and_record(tmp_path, content, message):
    path = _write(tmp_path, content, name="bad_llava.json")
    with pytest.raises(InputError, match=message) as raised:
        load_llava_instruct(path, "images")
    assert "bad_llava.json" in str(raised.value)


# ---------------------------------------------------------------- ShareGPT4V and the quality filter

SHAREGPT4V = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
                       {"from": "gpt", "value": "A white and red bus drives down a city street ..."}]},
    {"id": "text-only-1", "conversations": [{"from": "human", "value": "Write a haiku."},
                                             {"from": "gpt", "value": "..."}]},
    {"id": "sa_1", "image": "sam/images/sa_1.jpg",
     "conversations": [{"from": "human", "value": "Describe this image in detail.\n<image>"},
                       {"from": "gpt", "value": "A mountain lake ..."}]},
]


def test_sharegpt4v_records_skip_text_only_and_prefix_ids(tmp_path):
    skipped = {}
    prompts = load_llava_instruct(_write(tmp_path, SHAREGPT4V, "sharegpt4v.json"), "s3://bucket/data",
                                  source="sharegpt4v", skipped=skipped)
    assert [p["prompt_id"] for p in prompts] == ["sharegpt4v-000000033471-t0", "sharegpt4v-sa_1-t0"]
    assert prompts[1]["image"] == "s3://bucket/data/sam/images/sa_1.jpg"
    assert prompts[1]["instruction"] == "Describe this image in detail." and prompts[0]["source"] == "sharegpt4v"
    assert skipped == {"text_only": 1}
    # LLaVA-Instruct keeps requiring an image on every record
    with pytest.raises(InputError, match="record 1 .*missing field 'image'"):
        load_llava_instruct(_write(tmp_path, SHAREGPT4V, "as_llava.json"), "")


def test_quality_filter_counts_every_drop_by_reason(tmp_path, caplog):
    from m3po_core.data.quality import QualityFilterConfig, quality_filter

    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (4, 4), "red").save(root / "a.png")
    Image.new("RGB", (4, 4), "red").save(root / "a_copy.png")      # same bytes, other name
    Image.new("RGB", (4, 4), "blue").save(root / "b.png")
    good = (root / "b.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    row = lambda pid, img, q: {"prompt_id": pid, "image": str(root / img), "instruction": q}
    rows = [row("p0", "a.png", "What is shown here?"),
            row("p1", "a_copy.png", "what  is SHOWN here?"),        # duplicate: same image bytes, same words
            row("p2", "a.png", "Describe the colours."),             # same image, new instruction: kept
            row("p3", "b.png", "Hi"),                                # 1 word
            row("p4", "truncated.png", "What is shown here?"),       # does not decode
            row("p5", "missing.png", "What is shown here?"),         # not there
            row("p6", "b.png", " ".join(["word"] * 301))]            # too long
    with caplog.at_level("INFO", logger="m3po"):  # the logger Prefect routes into the run's logs
        kept, stats = quality_filter(rows, QualityFilterConfig())
    assert "quality filter: kept 2 of 7 prompts" in caplog.text
    assert [r["prompt_id"] for r in kept] == ["p0", "p2"]
    assert (stats["input"], stats["kept"], stats["instruction_length"], stats["duplicate"],
            stats["image_unreadable"]) == (7, 2, 2, 1, 2)
    assert stats["examples"] == {"instruction_length": ["p3", "p6"], "duplicate": ["p1"],
                                 "image_unreadable": ["p4", "p5"]}
    # without reading images, duplicates are by path: p1 (another file) stays, p4 and p5 too
    kept, stats = quality_filter(rows, QualityFilterConfig(check_images=False))
    assert [r["prompt_id"] for r in kept] == ["p0", "p1", "p2", "p4", "p5"] and stats["duplicate"] == 0
    assert quality_filter(rows, QualityFilterConfig(enabled=False))[0] == rows


def test_prompts_stage_mixes_sources_and_records_the_filter(tmp_path, image_root):
    from m3po_core.stages import prompts as prompts_step
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    (Path(image_root) / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(Path(image_root) / "coco/train2017/000000033471.jpg", format="PNG")
    cfg = load_config(Path(__file__).parent / "tiny.yaml", [
        "data.source=llava_instruct", f"data.path={_write(tmp_path, RECORDS)}", f"data.image_root={image_root}",
        f"data.extra_sources=[{{source: sharegpt4v, path: {_write(tmp_path, SHAREGPT4V, 's.json')}, "
        f"image_root: {image_root}}}]", "scoring.judge=openai:judge", "evaluation.benchmarks=[]"])
    store = RunStore(str(tmp_path / "store"), "mix")
    prompts_step.prepare_prompts(cfg, store)
    ids = [r["prompt_id"] for r in prompts_step.read_prompts_shard(store, 0)]
    # the ShareGPT4V prompt on the same COCO image as LLaVA's first asks another question: kept;
    # sa_1's image is not on disk: dropped and counted
    assert ids == ["000000033471-t0", "000000052846-t0", "sharegpt4v-000000033471-t0"]
    f = store.read_json("prompts/_stage.json")["filter"]
    assert (f["input"], f["kept"], f["image_unreadable"], f["text_only_records"]) == (4, 3, 1, 1)
