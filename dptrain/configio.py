"""Typed dataclass configs from YAML: unknown keys, wrong types and missing fields are errors.

One loader serves every config in the project (model, training, sweeps), so all of them report
mistakes the same way: the dotted path of the offending field and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dptrain.errors import UserError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys by their dotted path."""
    if not isinstance(data, dict):
        raise UserError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"missing config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def write_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def load(cls: type[T], path: str | Path, overrides: list[str] = ()) -> T:
    """Load `cls` from YAML, then apply dotted `key=value` overrides.

    A value is parsed as YAML, except for a string field, which takes the text as it is
    (`export.sample_prompt=KING HENRY:` is a string, not a mapping).
    """
    data = read_yaml(path)
    apply_overrides(data, overrides, cls)
    return from_dict(cls, data)


def _field_type(cls: Any, parts: list[str]) -> Any:
    """The annotation of the dotted field `parts` of dataclass `cls`, or None where unknown."""
    tp = cls
    for part in parts:
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[Section]
            inner = [t for t in typing.get_args(tp) if t is not type(None)]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                tp = inner[0]
    return tp


def _takes_text(tp: Any) -> bool:
    """True for a field typed str or Optional[str]: its override value is taken verbatim."""
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return set(typing.get_args(tp)) == {str, type(None)}
    return False


def apply_overrides(data: dict, overrides: list[str], cls: Any = None) -> dict:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{key}': '{part}' is not a section")
        tp = _field_type(cls, parts) if cls is not None else None
        if _takes_text(tp) and not (raw in ("null", "~") and tp is not str):
            node[parts[-1]] = raw
            continue
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"override '{key}': value is not valid YAML "
                            f"({str(err).splitlines()[0]})") from None
    return data
