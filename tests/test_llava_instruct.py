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
