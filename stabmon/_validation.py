"""Argument checks shared by every stage: one message shape, never ``assert``.

Each message names the argument, what is allowed and the value received, e.g.
``ValueError: `sample_every_n_steps` must be a positive int, got 0``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_in(name: str, value: Any, allowed: Collection[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {sorted(map(repr, allowed))}, got {value!r}")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive int{extra}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if not ok:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def check_optional_instance(name: str, value: Any, cls: type) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a ``cls`` (e.g. a stabmon config)."""
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"`{name}` must be a stabmon.{cls.__name__} or None, got {value!r}")
