"""Typed dataclass configs built from plain mappings (parsed YAML), with one-line errors.

Every config section is a dataclass. :func:`build` checks each key against the dataclass
fields (unknown keys are named, with a suggestion), converts values to the annotated type
and then calls the section's ``validate(prefix)`` method for range checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from dumo.errors import ConfigError

T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"config key '{key}' may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': bad value {_describe(value)}")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {_describe(value)}")
        item_types = get_args(annotation)
        if origin is tuple and item_types and item_types[-1] is not Ellipsis:
            if len(value) != len(item_types):
                raise ConfigError(f"config key '{key}' must have {len(item_types)} items; got {len(value)}")
            return tuple(_convert(v, a, key) for v, a in zip(value, item_types))
        item_type = item_types[0] if item_types else Any
        converted = [_convert(v, item_type, key) for v in value]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:  # a mapping from names (strings) to values of one type
        if not isinstance(value, typing.Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping; got {_describe(value)}")
        value_type = get_args(annotation)[1] if get_args(annotation) else Any
        converted = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"config key '{key}' must have string keys; got {_describe(name)}")
            converted[name] = _convert(item, value_type, f"{key}.{name}")
        return converted
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, prefix=key)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false; got {_describe(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer; got {_describe(value)}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"config key '{key}' must be a number; got {_describe(value)}")
        # .inf and .nan pass every "> 0" check and then train nothing or crash later: no key wants them
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string; got {_describe(value)}")
    raise TypeError(f"unsupported annotation {annotation!r} for '{key}'")  # a bug in dumo, not user input


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    where = f"'{prefix}'" if prefix else "the config"
    if data is None:
        data = {}
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values; got {_describe(data)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        values[key] = _convert(value, hints[key], full)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(prefix)
    return instance


def to_dict(instance: Any) -> Any:
    """A plain, YAML-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance
