"""Every configuration key with its type, default and meaning, read from the section dataclasses.

`describe()` walks `RunConfig`'s fields, its nested sections (`data.world`) and the sections of list
items (`data.extra_sources[]`), and writes one block per key: dotted key, readable type, default as
YAML writes it, and the field's `metadata["help"]` (sections.py); `m3po config [SECTION]` prints it.
Limit: it shows the dataclasses' defaults (the paper's where it gives one), not a file's values:
configs/demo.yaml, which runs read unless told otherwise, departs from several.
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

import yaml

from m3po_core.config.invalidation import FIELD_STAGES
from m3po_core.config.sections import RunConfig
from m3po_core.errors import ConfigError

WIDTH = 100
PREFACE = ("Defaults are the section dataclasses' (the paper's where it gives one); configs/demo.yaml, the run "
           "configuration `m3po run` reads unless --config names another, departs from several. \"Cache key of\" "
           "names the stages whose cached output a key's value decides (m3po_core/config/invalidation.py): "
           "changing it recomputes those stages, and the stages after them follow from their inputs.")
_WRAP = {"break_on_hyphens": False, "break_long_words": False}  # keep LLaVA-Instruct-150K, URLs and paths whole


def _list_item(tp: Any) -> type | None:
    """The dataclass of a list-of-sections type (`list[JudgeSpec]`), else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _sections(cls: type = RunConfig, prefix: str = "") -> dict[str, type]:
    """Every section's dotted name ("" for the top level; a list's items end in "[]") and its
    dataclass, depth first in field order."""
    found = {prefix: cls}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_sections(hints[f.name], key))
        elif (item := _list_item(hints[f.name])) is not None:
            found.update(_sections(item, key + "[]"))
    return found


def section_names() -> list[str]:
    """The names `describe` accepts (a list's items under the list's key)."""
    return [name.removesuffix("[]") for name in _sections() if name]


def type_name(tp: Any) -> str:
    """A field's type as a reader of the YAML needs it: `int`, `str | None`, `one of a, b`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        name = " | ".join(type_name(a) for a in inner)
        if len(inner) == len(args):
            return name
        return f"{name}, or None" if typing.get_origin(inner[0]) is Literal else f"{name} | None"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return "list of mappings" if _list_item(tp) is not None else f"list[{type_name(args[0])}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """`value` as YAML writes it in flow style: `32`, `null`, `[q_proj, v_proj]`, `''`, and a string with
    a newline double-quoted on one line (`"\\nAnswer ..."`)."""
    one_line = {"default_style": '"'} if isinstance(value, str) and not value.isprintable() else {}
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, **one_line)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return yaml_value(dataclasses.asdict(value) if dataclasses.is_dataclass(value := f.default_factory())
                          else value)
    return "required"


def _heading(name: str, cls: type) -> str:
    """`[section] ` and the first paragraph of the section's docstring, on one (wrapped) line."""
    summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
    return textwrap.fill(f"[{name or 'top level'}] {summary}", WIDTH, subsequent_indent="    ", **_WRAP)


def _block(name: str, cls: type) -> list[str]:
    """The section's heading and one block per key of its own (nested sections get blocks of their own)."""
    lines = [_heading(name, cls), ""]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        key = f"{name}.{f.name}" if name else f.name
        kind = type_name(tp)
        if _list_item(tp) is not None:
            kind += f", each with the keys {key}[].*"
        lines.append(f"{key} ({kind}; default: {_default(f)})")
        lines += textwrap.wrap(f.metadata.get("help", ""), WIDTH, initial_indent="    ", subsequent_indent="    ",
                               **_WRAP)
        if key in FIELD_STAGES:  # the items of a list of sections are part of their list's field
            stages = ", ".join(FIELD_STAGES[key]) or "none (how fast or where, not what)"
            lines.append(f"    Cache key of: {stages}.")
        lines.append("")
    return lines


def describe(section: str | None = None) -> str:
    """Every key of the configuration, or of one section (`sampling`, `data.world`) and the sections
    below it, grouped by section. Raises ConfigError naming an unknown section."""
    sections = _sections()
    if section:
        wanted = section.removesuffix("[]")
        if wanted not in section_names():
            raise ConfigError(f"unknown configuration section {section!r}; sections: {', '.join(section_names())}")
        sections = {name: cls for name, cls in sections.items()
                    if name.removesuffix("[]") == wanted or name.startswith((wanted + ".", wanted + "[]"))}
    lines = textwrap.wrap(PREFACE, WIDTH, **_WRAP) + [""]
    for name, cls in sections.items():
        lines += _block(name, cls)
    return "\n".join(lines).rstrip() + "\n"
