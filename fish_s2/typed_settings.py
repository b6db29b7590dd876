"""Typed settings from YAML mappings: a dataclass built from plain data, every key and type checked.

Shared by the serving config (``serving.yaml``) and the TensorRT-LLM settings (``llm_api.yaml``);
an unknown key or a wrong type is an error naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


def build(cls, data, where: str = ""):
    """Instantiate dataclass ``cls`` from plain data; ``where`` prefixes error paths (``engine.``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"{where}{key}: unknown setting")
    try:
        return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()})
    except TypeError as e:   # a required setting is missing
        raise ValueError(f"{where.rstrip('.') or 'config'}: {e}") from None


def _coerce(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def plain(value):
    """A dataclass's ``asdict`` as YAML-ready data (tuples as lists)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the settings ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data
