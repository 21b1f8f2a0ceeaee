"""What a setting is, and the checks every section shares.

A setting is a dataclass field with a one-line description (`setting()`); a choice is typed with `typing.Literal`,
so the allowed values live in the annotation and one check (`check_choices`, also run by `from_dict`) names the key
and those values. `from_dict` builds a section from a YAML mapping, rejecting unknown keys and wrong types by name.

A group (`group()`) is a dataclass of settings nested in a section, such as `train.experimental`: the options of the
recipes the ablation rejected, kept apart from the method's own settings. A section's `RENAMED_KEYS` maps a key's old
name to its place now (`"distill_weight": "experimental.distill_weight"`): `from_dict` reads the old name (configs,
overlays and adapters written before the move) and the section is written under the new one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

from ..errors import ConfigError


def setting(default, help: str, **kwargs):
    """A dataclass field with a one-line description (shown by `layerroute config --describe`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def group(cls, help: str):
    """A nested group of settings (a dataclass) inside a section, e.g. `train.experimental`."""
    return field(default_factory=cls, metadata={"help": help, "group": True})


def is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def move_renamed(cls, data: dict, section: str) -> dict:
    """`data` with each key that `cls.RENAMED_KEYS` names under its old name moved to its place now (a copy;
    `old` -> `group.key`). Both names given with different values is an error naming both."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        name, key = new.split(".", 1)
        inner = data.get(name)
        inner = dict(inner) if isinstance(inner, dict) else {}
        value = data.pop(old)
        if key in inner and inner[key] != value:
            raise ConfigError(f"{section}.{old} is the old name of {section}.{new}: give one of them "
                              f"(got {value!r} and {inner[key]!r})")
        inner[key] = value
        data[name] = inner
    return data


def check_range(section: str, name: str, value, low=None, high=None, low_open=False) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{section}.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{section}.{name} must be <= {high}, got {value!r}")


# ------------------------------------------------------------------------------------------------------------
# Choices: Literal annotations.


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def choices(annotation) -> tuple | None:
    """The allowed values of a Literal annotation (also inside `X | None`), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if _is_union(annotation):
        for arg in typing.get_args(annotation):
            found = choices(arg)
            if found is not None:
                return found
    return None


def _item_choices(annotation) -> tuple | None:
    """The allowed items of a `list[Literal[...]]` annotation, else None."""
    if typing.get_origin(annotation) is list and typing.get_args(annotation):
        return choices(typing.get_args(annotation)[0])
    return None


def _choice_error(key: str, value, annotation) -> str | None:
    """Why `value` is not an allowed choice of `annotation` (naming the key and the choices), or None."""
    allowed = choices(annotation)
    if allowed is not None and value not in allowed and not (value is None and _accepts_none(annotation)):
        return f"{key} must be one of {list(allowed)}, got {value!r}"
    allowed = _item_choices(annotation)
    if allowed is not None and isinstance(value, list):
        for item in value:
            if item not in allowed:
                return f"{key} must be one of {list(allowed)}, got {item!r}"
    return None


def _accepts_none(annotation) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_choices(obj, section: str) -> None:
    """Every Literal-typed setting of dataclass `obj` holds one of its values (run by each section's
    `__post_init__`, so a section built in code is checked as one read from YAML)."""
    renamed = getattr(type(obj), "RENAMED_VALUES", {})
    for name, annotation in _hints(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(value, str) and (name, value) in renamed:
            setattr(obj, name, renamed[(name, value)])
        error = _choice_error(f"{section}.{name}", getattr(obj, name), annotation)
        if error:
            raise ConfigError(error)


# ------------------------------------------------------------------------------------------------------------
# Generic construction from dicts, with type checks that name the key.


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if _is_union(annotation):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)  # list[Literal[...]]: its items are checked by _choice_error
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _accepts_float(annotation) -> bool:
    if annotation is float:
        return True
    if _is_union(annotation):
        return float in typing.get_args(annotation)
    return False


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is list and typing.get_args(annotation):
        return "list"
    return getattr(annotation, "__name__", annotation)


def from_dict(cls, data: dict | None, section: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and values outside a Literal's
    choices (naming `section.key`)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping, got {type(data).__name__}")
    data = move_renamed(cls, dict(data or {}), section)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    renamed = getattr(cls, "RENAMED_VALUES", {})
    for name, value in data.items():
        annotation = hints[name]
        if isinstance(value, str) and (name, value) in renamed:
            value = renamed[(name, value)]  # an old name for a choice (configs and adapters written before it)
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, f"{section}.{name}")
            continue
        if _accepts_float(annotation):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
                value = float(value)  # e.g. `2e-4` given as a string by a caller (YAML files: overrides.load_yaml)
        error = _choice_error(f"{section}.{name}", value, annotation)
        if error:
            raise ConfigError(error)
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{section}.{name} must be of type {_type_name(annotation)}, got {type(value).__name__} {value!r}"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err}") from err


def describe(cls, section: str) -> list[tuple[str, Any, str]]:
    """(`section.name`, default, one-line help) per setting of dataclass `cls`, in declaration order; a choice's
    help ends with its allowed values. Groups (`group()`) are not listed: `groups(cls)` names them."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if is_group(f):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        allowed = choices(hints[f.name]) or _item_choices(hints[f.name])
        help_text = f.metadata.get("help", "") + (f" [choices: {', '.join(map(str, allowed))}]" if allowed else "")
        rows.append((f"{section}.{f.name}", default, help_text))
    return rows


def groups(cls) -> list[tuple[str, type, str]]:
    """(name, dataclass, help) per group of settings of dataclass `cls` (`train.experimental`, ...)."""
    hints = _hints(cls)
    return [(f.name, hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(cls) if is_group(f)]
