"""Typed loading of the run configuration: YAML files and dicts, `dotted.key=value` overrides.

pydantic validates the dataclasses of sections.py as they are: each value against its field's type
in strict mode (an integer may stand for a float, nothing else is converted; a `Literal`'s choices;
lists; nested sections) and every unknown key is refused; the first error is reported naming the
key. YAML is read with `5e-5` as a float (YAML 1.2's rule; PyYAML's 1.1 rule reads it as a string).
Then `validate` (checks.py) checks ranges and rules across sections.
Limit: types only here; value ranges and rules across sections are checks.py's.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from m3po_core.config.checks import validate
from m3po_core.config.sections import RunConfig
from m3po_core.errors import ConfigError

# The repository's configs/ (the package is installed editable, see README and docker/).
CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


def _sections(cls: type, found: dict[type, None]) -> dict[type, None]:
    """Every dataclass the configuration nests, `cls` first."""
    found[cls] = None
    for tp in typing.get_type_hints(cls).values():
        for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
            if dataclasses.is_dataclass(arg) and arg not in found:
                _sections(arg, found)
    return found


for _section in _sections(RunConfig, {}):  # pydantic reads this off each dataclass: unknown keys are refused
    _section.__pydantic_config__ = ConfigDict(extra="forbid")
_ADAPTER = TypeAdapter(RunConfig)


def _key(loc: tuple) -> tuple[str, Any]:
    """The dotted key an error's location names (`data.extra_sources[0].path`; a union's member
    tags dropped) and the type found there."""
    key, tp = "", RunConfig
    for part in loc:
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(members) == 1:
            tp = members[0]  # Optional[...]
        if isinstance(part, int) and typing.get_origin(tp) is list:
            key, tp = f"{key}[{part}]", typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp) and part in (hints := typing.get_type_hints(tp)):
            key, tp = f"{key}.{part}" if key else str(part), hints[part]
        else:
            break
    return key, tp


def _config_error(error: ValidationError) -> ConfigError:
    """pydantic's first error as one line naming the key (all the messages of a union's members)."""
    errors = error.errors(include_url=False)
    first = errors[0]
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        where, section = _key(first["loc"][:-1])
        known = sorted(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else []
        key = f"{where}.{first['loc'][-1]}" if where else str(first["loc"][-1])
        return ConfigError(f"unknown configuration key '{key}' (known here: {', '.join(known)})")
    key = _key(first["loc"])[0]
    if first["type"] == "missing":
        return ConfigError(f"configuration key '{key}' is required")
    same = [e["msg"] for e in errors if _key(e["loc"])[0] == key]
    return ConfigError(f"configuration key '{key}': {'; or '.join(same)}, got {first.get('input')!r}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"configuration key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading `5e-5` as a float, as YAML 1.2 does (YAML 1.1, PyYAML's rule,
    wants a dot in a float: `5.0e-5`, and reads `5e-5` as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML, so `3`, `0.5`, `5e-5`, `true`, `[x, y]` get their types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.load(raw, Loader=_Loader) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.load(path.read_text(), Loader=_Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"configuration file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"configuration file {path}: top level must be a mapping")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """The configuration `tree` (a YAML file's mapping, a run's config.json) as a RunConfig, each
    value validated against its field's type by pydantic in strict mode, then checked across
    sections (`validate`). Strict, read as JSON: a mapping fills a section, an integer may stand
    for a float, and nothing else is converted (`true` is not the count 1, `"4"` is not 4)."""
    try:
        cfg = _ADAPTER.validate_json(json.dumps(tree, default=str), strict=True)
    except ValidationError as e:
        raise _config_error(e) from None
    return validate(cfg)
