"""Dataclass configs, loaded from YAML with strict validation.

Every component has a dataclass config. `from_dict` builds one from plain data (YAML), rejecting
unknown keys by name and checking types; each dataclass then range-checks its own values in
`__post_init__` through `cmoe_base.check`, so every error names the offending field and what is allowed:

    ConfigError: model.chunk.target_ratio = 0.5: must be >= 1 (1 = no compression)
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cmoe_base import ConfigError, check

T = TypeVar("T")


def _convert(tp: Any, value: Any, name: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a ConfigError naming `name`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name} = {value!r}: expected {tp}")
    if origin is Literal:
        check(value in args, name, value, f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), name, value, "must be a list")
        item = args[0] if args else Any
        out = [_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        check(isinstance(value, dict), name, value, "must be a mapping")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, name): _convert(vt, v, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        check(isinstance(value, dict), name, value, f"must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=name)
    if tp is bool:
        check(isinstance(value, bool), name, value, "must be true or false")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "must be a number")
        check(math.isfinite(value), name, value, "must be a finite number")
        return float(value)
    if tp is str:
        check(isinstance(value, str), name, value, "must be a string")
        return value
    return value


def _drop_legacy_keys(cls: type, data: dict[str, Any], prefix: str) -> None:
    """Keys a class lists in `legacy_keys` (key -> (the value that is now the default, why it went)):
    dropped from `data` when they hold that value (configs written by older versions), else an error."""
    for key, (default, why) in getattr(cls, "legacy_keys", {}).items():
        if key in data:
            value = data.pop(key)
            check(value == default, f"{prefix}.{key}" if prefix else key, value, why)


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and bad types raise a ConfigError by name."""
    data = dict(data or {})
    _drop_legacy_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} in {cls.__name__}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(hints[key], value, name)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        # Field checks in __post_init__ only know the local field name: add the path.
        raise ConfigError(f"{prefix}.{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a (nested) dataclass config, suitable for YAML/JSON."""
    return dataclasses.asdict(cfg)


def to_overrides(cfg: Any, prefix: str) -> list[str]:
    """`prefix.a.b=value` lines (values as JSON, which `apply_overrides` parses back) that set every
    field of the dataclass config `cfg`: how a script hands a config it built to `load_experiment`."""
    out: list[str] = []

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        else:
            out.append(f"{path}={json.dumps(list(value) if isinstance(value, tuple) else value)}")

    walk(prefix, to_dict(cfg))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid YAML: {' '.join(str(e).split())}") from None  # the message names the file
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply command-line `a.b.c=value` overrides (value parsed as YAML) to nested plain data."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.chunk.target_ratio=2")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


__all__ = ["ConfigError", "check", "from_dict", "to_dict", "to_overrides", "load_yaml", "apply_overrides"]
