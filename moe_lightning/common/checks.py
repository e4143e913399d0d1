"""Config checks: each raises a ``ValueError`` that names the field and what it allows."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    """``value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_positive(field: str, value: float | None) -> None:
    """``value`` must be a number > 0."""
    if value is None or value <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")


def check_nonnegative(field: str, value: float | None) -> None:
    """``value`` must be a number >= 0."""
    if value is None or value < 0:
        raise ValueError(f"{field} must be >= 0, got {value!r}")


def check_positive_int(field: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must be an ``int`` >= 1 (a ``bool`` is not), or ``None`` where ``allow_none``."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
