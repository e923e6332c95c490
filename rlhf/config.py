"""Typed, documented, strict configs built from plain dicts.

Every stage declares a dataclass whose fields carry a type, a default that runs
a tiny CPU job and a one-line help text (``opt(default, "help")``). ``build``
turns the recipe's dict into that dataclass and rejects unknown keys and wrong
types with the key path (and the YAML line when known), nanoGPT-style.

Why not OmegaConf structured configs: their errors name the key but not the
recipe line, allow int->float->str coercions we want to refuse, and don't
support ``str | Dataclass`` shorthands such as ``model: tiny``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Callable, Literal, Union

from rlhf.errors import BadInput

Where = Callable[[str], str]
"""Maps a dotted key path to a location prefix such as ``recipe.yaml:12: ``."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default (deep-copied if mutable) and help text."""
    # Deep copies: a shallow copy of e.g. DataConfig() would share its
    # `columns` dict between every stage that uses the default.
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def require_positive(cfg: Any, fail: Callable, *keys: str) -> None:
    """For a config's ``check``: raise ``fail(key, ...)`` for the first of
    ``keys`` whose value is below 1 (counts, sizes, step intervals)."""
    for key in keys:
        if getattr(cfg, key) < 1:
            raise fail(key, f"expected a positive integer, got {getattr(cfg, key)}")


def required(help: str) -> Any:
    return field(metadata={"help": help})


def _no_where(path: str) -> str:
    return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, where: Where, msg: str) -> BadInput:
    return BadInput(f"{where(path)}key '{path}': {msg}")


def _convert(tp: Any, value: Any, path: str, where: Where) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # A mapping goes to the dataclass alternative (so its own errors, with
        # the inner key path, surface); anything else tries the plain types,
        # which is how `model: tiny` works as shorthand for a ModelConfig.
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and classes:
            return build(classes[0], value, path, where)
        for arg in args:
            if arg is type(None) or dataclasses.is_dataclass(arg):
                continue
            try:
                return _convert(arg, value, path, where)
            except BadInput:
                pass
        raise _fail(path, where, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _fail(path, where, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(path, where, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}.{i}", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, where, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{path}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, where, f"expected a mapping, got {value!r}")
        return build(tp, value, path, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        # An integer is a valid float (lr: 1 is fine); a string is not.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, where, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, where, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type, data: dict, path: str = "", where: Where = _no_where) -> Any:
    """Build dataclass ``cls`` from ``data``, strictly.

    Unknown keys, missing required keys and wrong types raise ``BadInput``
    naming the dotted key path (and the recipe line via ``where``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise _fail(f"{prefix}{key}", where, f"unknown key (expected one of: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}", where)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _fail(f"{prefix}{name}", where, f"required ({f.metadata.get('help', '')})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(lambda key, msg: _fail(f"{prefix}{key}", where, msg))
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for saving the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls: type, indent: str = "") -> str:
    """Render the fields of a config dataclass as YAML-ish help text."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else "REQUIRED")
        tp = hints[f.name]
        if dataclasses.is_dataclass(default):
            lines.append(f"{indent}{f.name}:  # {f.metadata.get('help', '')}")
            lines.append(describe(type(default), indent + "  "))
            continue
        shown = "null" if default is None else default
        lines.append(f"{indent}{f.name}: {shown}  # ({_type_name(tp)}) {f.metadata.get('help', '')}")
    return "\n".join(lines)
