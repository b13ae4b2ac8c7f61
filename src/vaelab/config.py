"""Typed dataclass configs: from/to JSON dicts and `--set key=value` overrides, type-checked."""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError

# Integers in configs become tensor sizes, seeds and counts: int64 is what torch accepts.
MAX_INT = 2**63


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build `cls` from a dict, refusing unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    checked = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        config = cls(**checked)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def apply_overrides(config: Any, overrides: list[str], flag: str = "--set") -> Any:
    """Return a copy of `config` with each "key=value" applied; values are Python literals.
    `flag`: how the user gave them, for the errors (`vaelab config RUN key=value` has no --set)."""
    values = config_to_dict(config)
    names = [f.name for f in dataclasses.fields(config)]
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        if key not in names:
            raise ConfigError(
                f"{flag} {key}: unknown field of {type(config).__name__}; fields: {', '.join(names)}"
            )
        values[key] = parse_literal(text.strip(), key)
    return config_from_dict(type(config), values, where=flag)


def parse_literal(text: str, key: str = "value") -> Any:
    """'[400]' -> [400], '0.5' -> 0.5, 'true' -> True; anything else is taken as a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` (ints widened to float, lists to tuples where asked) or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not {_describe(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected none, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= MAX_INT:
                raise ConfigError(f"{where}: {value} is out of range (at most {MAX_INT - 1})")
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int beyond float's range
                value = math.inf
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {value} is not a finite number")
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item_hint = args[0] if args else Any
            items = [check_type(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    else:
        raise ConfigError(f"{where}: unsupported field type {hint!r}")
    raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return f"a list of {_describe(item)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def option(default, help: str, const: Any = None, metavar: str | None = None):
    """A config field with its documentation in `help` metadata: a TrainConfig field's command-line
    help, a model config field's line in `vaelab models --fields`. A list default is copied per
    instance, as `field(default_factory=...)` would. `const` makes a TrainConfig field's flag take
    an optional value (`--tensorboard [DIR]`): the flag alone stands for `const`; `metavar` names
    the value in the help."""
    metadata = {"help": help}
    if const is not None:
        metadata["const"] = const
    if metavar is not None:
        metadata["metavar"] = metavar
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, message: str) -> None:
    """Config validation helper: raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)
