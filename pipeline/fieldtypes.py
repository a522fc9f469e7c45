"""Type checks of config fields against their annotations, shared by every config dataclass
(stage configs in :mod:`pipeline.config`, :class:`pipeline.sae.SAEConfig` read from ``cfg.json``),
so a value of the wrong type is a :class:`~pipeline.errors.ConfigError` naming the field, never a
``TypeError`` deep inside torch or the trainer."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from pipeline.errors import ConfigError


def union_members(hint: Any) -> tuple[Any, ...]:
    """``(int, float, NoneType)`` for ``int | float | None``; ``(hint,)`` for anything else."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def check_field_type(name: str, value: Any, hint: Any) -> None:
    """Raise ConfigError unless ``value`` fits the annotation ``hint``: null only where the field
    allows None, numbers finite, ``int`` never ``bool``, lists element by element (``list[str]``),
    dicts of any content."""
    members = union_members(hint)
    if value is None:
        if type(None) in members:
            return
        raise ConfigError(f"{name} cannot be null; give a value or remove it to use the default.")
    for member in members:
        kind = typing.get_origin(member) or member
        if kind is Any:
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}.")
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is list and isinstance(value, list):
            element = typing.get_args(member)
            for i, item in enumerate(value if element else ()):
                check_field_type(f"{name}[{i}]", item, element[0])
            return
        if kind in (str, bool, dict) and isinstance(value, kind):
            return
    wanted = " or ".join(getattr(m, "__name__", str(m)) for m in members if m is not type(None))
    raise ConfigError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__}).")


def check_dataclass_types(instance: Any) -> None:
    """:func:`check_field_type` for every init field of the dataclass ``instance``."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if f.init:
            check_field_type(f.name, getattr(instance, f.name), hints[f.name])
