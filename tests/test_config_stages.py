"""Which stages each configuration field decides (m3po_core/config/invalidation.py), and the cache
keys made from that: every field is declared, and changing a field changes exactly the keys of the
stages it declares."""
import copy
import dataclasses
import types
import typing

import pytest

from m3po_core.config import RunConfig, load_config
from m3po_core.config.invalidation import FIELD_STAGES, INTRODUCED_AT, STAGES, fields_of
from m3po_core.stages.runner import stage_config, stage_key


def leaf_fields(cls=RunConfig, prefix=""):
    """Every field of the configuration by its dotted name, nested sections walked into (a list of
    sections is one field)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


LEAVES = dict(leaf_fields())


def test_every_field_declares_its_stages_and_nothing_else_is_declared():
    assert sorted(FIELD_STAGES) == sorted(LEAVES), (
        f"fields without a declaration: {sorted(set(LEAVES) - set(FIELD_STAGES))}; "
        f"declared but no such field: {sorted(set(FIELD_STAGES) - set(LEAVES))}")
    for name, stages in FIELD_STAGES.items():
        assert set(stages) <= set(STAGES), name
        assert len(set(stages)) == len(stages), name
    assert all(fields_of(stage) for stage in STAGES)  # every stage's key holds some configuration


def test_the_declarations_read_as_the_project_means_them():
    """Spot checks of the table against what each field does."""
    assert FIELD_STAGES["selection.alpha"] == ("pairs",)
    assert FIELD_STAGES["sampling.temperature"] == ("candidates", "candidates_round", "ipa")
    assert FIELD_STAGES["sampling.n"] == ("candidates",)  # adaptive rounds are shared by runs with another n
    for speed_only in ("sampling.concurrency", "scoring.judge_concurrency", "scoring.clip.batch_size",
                       "training.gradient_checkpointing", "sampling.api_key_env", "scoring.judge_api_key_env",
                       "execution.shards", "data.filter.image_threads", "name"):
        assert FIELD_STAGES[speed_only] == (), speed_only


def _other_value(value, tp):
    """A valid value of type `tp` other than `value`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next(a for a in args if a != value)
    if origin in (typing.Union, types.UnionType):
        if value is not None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _other_value(None, inner[0]) if typing.get_origin(inner[0]) is not typing.Literal else inner[0].__args__[0]
    if tp is bool:
        return not value
    if tp is int:
        return (value or 0) + 1
    if tp is float:
        return (value or 0.0) + 0.125
    if tp is str:
        return (value or "") + "x"
    if origin is list:
        item = args[0]
        if dataclasses.is_dataclass(item):  # a list of sections: one more item, its required keys filled
            required = {f.name: "x" for f in dataclasses.fields(item)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
            if "source" in required:
                required["source"] = "llava_instruct"
            return list(value or []) + [item(**required)]
        return list(value or []) + [_other_value(None, item)]
    raise TypeError(tp)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_changing_a_field_changes_exactly_the_keys_of_its_stages(name):
    base = load_config(None)
    changed = copy.deepcopy(base)
    *path, last = name.split(".")
    section = changed
    for part in path:
        section = getattr(section, part)
    value = _other_value(getattr(section, last), LEAVES[name])
    setattr(section, last, value)
    moved = {stage for stage in STAGES if stage_key(base, stage, "inputs") != stage_key(changed, stage, "inputs")}
    assert moved == set(FIELD_STAGES[name]), name
    # a field back at the value it was introduced at leaves the key (INTRODUCED_AT): the key still moves
    in_key = name not in INTRODUCED_AT or value != INTRODUCED_AT[name]
    for stage in FIELD_STAGES[name]:
        assert (name in stage_config(changed, stage)) == in_key
