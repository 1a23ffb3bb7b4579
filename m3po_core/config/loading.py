"""Typed loading of the run configuration: YAML files and dicts, `dotted.key=value` overrides.

Each value is checked against its field's type (`int`, `float`, `str`, `bool`, a `Literal`'s choices,
lists, nested sections) and every unknown key is refused, naming it; then `validate` (checks.py)
runs. Limit: types only (value ranges and rules across sections are checks.py's); PyYAML reads
`5e-5` as a string (YAML 1.1's float rule), which float fields accept and other fields refuse.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from m3po_core.config.checks import validate
from m3po_core.config.sections import RunConfig
from m3po_core.errors import ConfigError

# The repository's configs/ (the package is installed editable, see README and docker/).
CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type the value fits, in the order the field declares them
            try:
                return _check_value(value, option, key)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"configuration key '{key}': {value!r} fits none of: " + "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"configuration key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"configuration key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"configuration key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `5e-5` (no dot) as a string: YAML 1.1's float rule
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"configuration key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"configuration key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"configuration key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"configuration key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported configuration type {tp!r} at {key}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown configuration key '{where}' (known here: {', '.join(sorted(known))})")
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"configuration key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML, so `3`, `0.5`, `true`, `[x, y]` get their types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
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
    return validate(_build(RunConfig, tree))
