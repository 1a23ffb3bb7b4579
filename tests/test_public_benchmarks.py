"""Public POPE / MME releases in their Parquet layout, imported into a run's store."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from m3po_core.stages import benchmarks
from m3po_core.data.images import load_image
from m3po_core.config import load_config
from m3po_core.errors import InputError
from m3po_core.store import RunStore
from pathlib import Path

TINY = Path(__file__).parent / "tiny.yaml"


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _pope(path, rows):
    pq.write_table(pa.table({
        "question_id": [r[0] for r in rows], "question": [r[1] for r in rows], "answer": [r[2] for r in rows],
        "image": pa.array([{"bytes": _png(r[3]), "path": None} for r in rows], IMAGE),
        "category": [r[4] for r in rows]}), path)


def test_pope_release_with_embedded_images_becomes_the_runs_questions(tmp_path):
    src = tmp_path / "pope"
    src.mkdir()
    _pope(src / "test-00000-of-00002.parquet", [("1", "Is there a dog in the image?", "yes", "red", "random"),
                                                ("2", "Is there a cat in the image?", "no", "red", "random")])
    _pope(src / "test-00001-of-00002.parquet", [("3", "Is there a car in the image?", "No", "blue", "adversarial")])
    cfg = load_config(TINY, [f"evaluation.pope_path={src}"])
    store = RunStore(str(tmp_path / "runs"), "r")
    qs = benchmarks.benchmark_questions(cfg, store, "pope")
    assert [q["question_id"] for q in qs] == ["1", "2", "3"]
    assert qs[0]["instruction"] == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert [q["answer"] for q in qs] == ["yes", "no", "no"] and qs[2]["category"] == "adversarial"
    assert qs[0]["image"] == qs[1]["image"] != qs[2]["image"]            # one stored file per distinct image
    assert len(list((tmp_path / "runs/r/eval/images").iterdir())) == 2
    assert load_image(qs[2]["image"], "x").getpixel((0, 0)) == (0, 0, 255)


def test_mme_release_with_image_paths_relative_to_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/0001.png").write_bytes(_png("green"))
    pq.write_table(pa.table({"question_id": ["code_reasoning/0001.png"] * 2,
                             "question": ["Is the output 3? Please answer yes or no.", "Is the output 4? Please answer yes or no."],
                             "answer": ["Yes", "No"], "image": ["images/0001.png"] * 2,
                             "category": ["code_reasoning"] * 2}), tmp_path / "mme.parquet")
    cfg = load_config(TINY, [f"evaluation.mme_path={tmp_path / 'mme.parquet'}", "evaluation.answer_suffix="])
    qs = benchmarks.benchmark_questions(cfg, RunStore(str(tmp_path / "runs"), "r"), "mme")
    assert [q["question_id"] for q in qs] == ["code_reasoning/0001.png"] * 2       # acc+ pairs them
    assert qs[0]["instruction"] == "Is the output 3? Please answer yes or no." and qs[1]["answer"] == "no"
    assert qs[0]["row_id"] != qs[1]["row_id"]


def test_mme_question_is_built_as_lmms_eval_builds_it_for_llava(tmp_path):
    # lmms-eval (mme_doc_to_text, default kwargs): strip, drop " Please answer yes or no.", add its suffix
    (tmp_path / "0001.png").write_bytes(_png("green"))
    pq.write_table(pa.table({"question_id": ["OCR/0001.png"] * 2,
                             "question": [" Is the word 'stop'? Please answer yes or no. ", "Is the word 'go'?"],
                             "answer": ["Yes", "No"], "image": ["0001.png"] * 2, "category": ["OCR"] * 2}),
                   tmp_path / "mme.parquet")
    cfg = load_config(TINY, [f"evaluation.mme_path={tmp_path / 'mme.parquet'}"])
    qs = benchmarks.benchmark_questions(cfg, RunStore(str(tmp_path / "runs"), "r"), "mme")
    suffix = "\nAnswer the question using a single word or phrase."
    assert [q["instruction"] for q in qs] == ["Is the word 'stop'?" + suffix, "Is the word 'go'?" + suffix]


@pytest.mark.parametrize("broken, message", [
    ({"drop": "category"}, r"lacks columns \['category'\]"),
    ({"answer": "maybe"}, r"row 0 \(question_id '1'\): answer 'maybe' is not yes/no"),
    ({"image": "missing.png"}, r"row 0 \(question_id '1'\): image file .*missing.png not found"),
])
def test_a_broken_release_is_refused_naming_file_row_and_field(tmp_path, broken, message):
    cols = {"question_id": ["1"], "question": ["Is there a dog?"], "answer": [broken.get("answer", "yes")],
            "image": [broken.get("image", "a.png")], "category": ["random"]}
    (tmp_path / "a.png").write_bytes(_png("red"))
    cols.pop(broken.get("drop", "-"), None)
    pq.write_table(pa.table(cols), tmp_path / "pope.parquet")
    cfg = load_config(TINY, [f"evaluation.pope_path={tmp_path / 'pope.parquet'}"])
    with pytest.raises(InputError, match=message) as err:
        benchmarks.benchmark_questions(cfg, RunStore(str(tmp_path / "runs"), "r"), "pope")
    assert "pope.parquet" in str(err.value)


def test_llava_instruct_data_needs_the_public_benchmarks():
    from m3po_core.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.pope_path"):
        load_config(TINY, ["data.source=llava_instruct", "scoring.judge=openai:gpt-4o", "evaluation.benchmarks=[pope,mme]"])
