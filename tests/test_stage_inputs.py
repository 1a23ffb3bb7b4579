"""Bad prompts are refused before any work, naming the row at fault."""
import pytest

from m3po_core.errors import InputError
from m3po_core.stages.prompts import validate_prompts


def test_duplicate_prompt_ids_name_both_rows():
    rows = [{"prompt_id": "a", "instruction": "q", "image": "x.png"},
            {"prompt_id": "b", "instruction": "q", "image": "x.png"},
            {"prompt_id": "a", "instruction": "q2", "image": "y.png"}]
    with pytest.raises(InputError, match=r"shard 0 row 2: prompt_id 'a' repeats row 0"):
        validate_prompts(rows, "shard 0")


def test_missing_image_reference_is_named():
    with pytest.raises(InputError, match=r"row 0 .*'p'.*no image"):
        validate_prompts([{"prompt_id": "p", "instruction": "q", "image": ""}], "prompts")
