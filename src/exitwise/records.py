"""One JSON mapping for the frozen dataclasses that saved files are made of (results.json, calibration.json, an
ONNX export's manifest.json, a model card): `to_json(value)` writes fields by name (and properties: derived, so
`from_json` skips them); `from_json(kind, doc)` reads them back by the type hints. Thresholds are floats in memory,
-inf (`NEVER`) for "never leave at this exit", written as null. Torch- and numpy-free.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

Thresholds = typing.NewType("Thresholds", tuple)  # one float per side exit; -inf: never leave there (JSON: null)
NEVER = -math.inf
JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "an object"}  # how a message names the JSON type a value should have been
_ABSENT_WHEN_NONE = "absent_when_none"


def optional():
    """A field that defaults to None and is left out of the JSON while None: a key some files lack (older ones, or
    those not of a kind that has it), so they read and write back as they are."""
    return dataclasses.field(default=None, metadata={_ABSENT_WHEN_NONE: True})


def to_json(value):
    if dataclasses.is_dataclass(value):
        out = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
               if not (f.metadata.get(_ABSENT_WHEN_NONE) and getattr(value, f.name) is None)}
        out.update({name: to_json(getattr(value, name)) for name, attr in vars(type(value)).items()
                    if isinstance(attr, property)})
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return None if value == NEVER else value


def from_json(kind, value):
    """`value` (parsed JSON) as type `kind`: dataclasses, unions (the member the value's JSON type fits, else the
    first), tuple[X, ...], tuple[X, Y], dict[str, X]; an `X | None` dataclass short of a field without a default
    reads as None. A value of another JSON type than its hint's (a string for a tuple, a number for a string) raises
    TypeError naming the field, which each file's reader words as one line."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    expected = _read_from(kind)
    if expected and (not isinstance(value, expected) or isinstance(value, bool) and bool not in expected):
        raise TypeError(f"{json.dumps(value)[:40]} is not {JSON_NAMES[expected[-1]]}")
    if kind is Thresholds:
        return tuple(NEVER if v is None else from_json(float, v) for v in value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _field(hints[f.name], f.name, value[f.name]) for f in dataclasses.fields(kind)
                       if f.name in value})
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = next((a for a in members if isinstance(value, _read_from(a))), members[0])
        if dataclasses.is_dataclass(inner) and any(f.name not in value for f in dataclasses.fields(inner)
                                                   if f.default is f.default_factory is dataclasses.MISSING):
            return None  # an older file's record short of a field (a cache measured without a model holds `{}`)
        return from_json(inner, value)
    if origin is tuple:
        items = zip(args, value) if Ellipsis not in args else ((args[0], v) for v in value)
        return tuple(from_json(a, v) for a, v in items)
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in value.items()}
    if kind is float:
        return float(value)
    return value


def _field(kind, name: str, value):
    try:
        return from_json(kind, value)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


def _read_from(kind) -> tuple[type, ...]:
    """The JSON values type `kind` is read from (which member of a union a value is; () for any)."""
    if kind is Thresholds or typing.get_origin(kind) is tuple:
        return (list,)
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) is dict:
        return (dict,)
    if kind is float:
        return (int, float)
    return (kind,) if kind in (str, int, bool) else ()
