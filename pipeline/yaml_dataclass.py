"""YAML data -> frozen dataclasses, strictly: an unknown key or a value of the wrong type is an
:class:`InputError` naming the file and the key's dotted path, never a silent default. Used by
:func:`pipeline.config.load_config` for ``datasets.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError


def build_dataclass(cls: type, data: Any, where: str, source: Path) -> Any:
    """Recursively build dataclass ``cls`` from YAML data, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise InputError(source, f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(source, f"unknown key(s) under {where}: {', '.join(unknown)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}", source) for k, v in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, source: Path) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, where, source)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(source, f"{where} must be a mapping")
        return {str(k): _convert(vt, v if v is not None else {}, f"{where}.{k}", source) for k, v in value.items()}
    if origin is tuple and typing.get_args(tp)[-1:] == (Ellipsis,):
        if not isinstance(value, list | tuple):
            raise InputError(source, f"{where} must be a list, got {value!r}")
        return tuple(_convert(typing.get_args(tp)[0], v, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(source, f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(_convert(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise InputError(source, f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, where, source) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where, source)
    if tp is Path:
        if not isinstance(value, str):
            raise InputError(source, f"{where} must be a path string, got {value!r}")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(source, f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(source, f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(source, f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    return value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())
