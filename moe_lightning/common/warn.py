"""Warn once per message, however often the code path runs (a dispatch fallback would otherwise warn every step)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

_seen_in_process: set[str] = set()


def warn_once(
    message: str, store: set[str] | None = None, warn: Callable[..., None] | None = None, stacklevel: int = 2
) -> None:
    """Emit ``message`` the first time it is seen.

    Args:
        message: the warning text; the same text later is dropped.
        store: the messages already emitted; default one set for the whole process. A callback passes its own,
            so that each instance warns once.
        warn: how to emit it; default :func:`warnings.warn`. Callbacks pass Lightning's ``rank_zero_warn`` so that
            a DDP run warns once, not once per rank.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of ``warn_once``.
    """
    seen = _seen_in_process if store is None else store
    if message in seen:
        return
    seen.add(message)
    (warn or warnings.warn)(message, stacklevel=stacklevel + 1)
