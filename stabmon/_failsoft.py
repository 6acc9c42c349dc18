"""Fail soft: a fault in the monitor disables that part and warns once; training goes on."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StabmonWarning(UserWarning):
    """Category of every warning stabmon emits (filter it with ``warnings.filterwarnings``)."""


class FailSoft:
    """Runs monitor components; on an exception warns once and disables the component.

    With ``strict=True`` (the test suite sets ``STABMON_STRICT=1``) exceptions propagate so
    that bugs cannot hide behind the fail-soft guard.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.disabled: dict[str, str] = {}
        self._said: set[str] = set()

    def run(self, component: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        if component in self.disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if self.strict:
                raise
            self.disabled[component] = repr(err)
            self.warn_once(component, f"stabmon: {component} disabled after an error: {err!r}. Training goes on.")
            return None

    def warn_once(self, key: str, message: str) -> None:
        if key in self._said:
            return
        self._said.add(key)
        warnings.warn(message, StabmonWarning, stacklevel=3)
