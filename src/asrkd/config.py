"""Typed configuration: YAML files and dotted command-line overrides -> frozen dataclasses.

One mechanism serves every config (model, data, training, trainer) and every checkpoint: a
key that the dataclass lacks is an error that names the full key path and suggests the
nearest valid key, never a silently ignored default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from asrkd.errors import ConfigError

T = TypeVar("T")




def unknown_key_error(key: str, path: str, valid: Iterable[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}; valid keys here: {', '.join(valid)}")


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(annotation))
    return False


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise :class:`ConfigError`.

    Nested dataclass fields accept a mapping (merged over the field's default) or None where
    the field is optional; lists become tuples where the field is a tuple.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config '{path or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(key, path, fields)
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        sub = _dataclass_in(annotation)
        key_path = f"{path}.{name}" if path else name
        if sub is not None and isinstance(value, Mapping):
            default = _field_default(fields[name])
            base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[name] = from_dict(sub, {**base, **value}, key_path)
        elif sub is not None and dataclasses.is_dataclass(value):
            kwargs[name] = value
        elif _is_tuple(annotation):
            kwargs[name] = _coerce_tuple(annotation, _to_tuple(value), key_path)
        else:
            kwargs[name] = _coerce(annotation, value, key_path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config '{path or cls.__name__}': {error}") from None


def _scalar_types(annotation: Any) -> tuple[type, ...]:
    """The scalar types among ``X``, ``X | None``, ``Optional[X]`` (empty for anything else)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (
        annotation,
    )
    return tuple(a for a in args if a in (int, float, bool, str))


def _coerce(annotation: Any, value: Any, key_path: str) -> Any:
    """Convert a YAML scalar to the field's number type where YAML guessed differently.

    PyYAML follows YAML 1.1, which reads ``5e-4`` (no dot) as a *string*, so ``lr: 5e-4``
    would otherwise reach AdamW as ``'5e-4'``; an int given for a float field becomes a float.
    Fields that also accept strings are left alone. A string that is not a number is an error
    naming the key.
    """
    types_ = _scalar_types(annotation)
    if not types_ or value is None or isinstance(value, bool) or str in types_:
        return value
    if type(value) in types_:
        return value
    if float in types_ and isinstance(value, (int, str)):
        target, wanted = float, "a number"
    elif int in types_ and isinstance(value, (str, float)):
        target, wanted = int, "an integer"
    else:
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"config key '{key_path}' needs {wanted}, got {value!r}") from None
    if target is int:
        if not number.is_integer():
            raise ConfigError(f"config key '{key_path}' needs {wanted}, got {value!r}")
        return int(number)
    return number


def _coerce_tuple(annotation: Any, value: Any, key_path: str) -> Any:
    """Coerce the items of a ``tuple[float, ...]``-style field (see :func:`_coerce`)."""
    if not isinstance(value, tuple):
        return value
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is tuple:
            args = typing.get_args(candidate)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(args[0], v, f"{key_path}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(
                    _coerce(a, v, f"{key_path}[{i}]") for i, (a, v) in enumerate(zip(args, value))
                )
    return value


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples kept) of a dataclass config; safe for ``weights_only`` loads."""
    return dataclasses.asdict(config)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursively merge ``update`` over ``base`` (mappings merge, everything else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_overrides(tokens: Iterable[str]) -> dict:
    """``["--model.encoder.d_model", "144", "trainer.max_steps=10"]`` -> nested dict.

    Values are parsed as YAML scalars/lists (``10`` -> int, ``[4, 2]`` -> list, ``null``).
    """
    tokens = list(tokens)
    result: dict = {}
    index = 0
    while index < len(tokens):
        token = tokens[index].removeprefix("--")
        if "=" in token:
            key, raw = token.split("=", 1)
            index += 1
        else:
            if index + 1 >= len(tokens):
                raise ConfigError(f"override '{tokens[index]}' has no value")
            key, raw = token, tokens[index + 1]
            index += 2
        value = yaml.safe_load(raw) if raw != "" else ""
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with an earlier override")
        node[parts[-1]] = value
    return result
