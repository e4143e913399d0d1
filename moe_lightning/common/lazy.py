"""A package's names imported on first use, so that importing the package (and ``--help``) stays cheap."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable


def lazy_names(
    package: str, sources: dict[str, str], moved: dict[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: ``sources[name]`` is the submodule that defines
    ``name``; it is imported when ``name`` is first read, and the name is then kept in the package.

    ``moved[name]`` is the package a name left ``package`` for: for one release it still reads from ``package``, with
    a ``FutureWarning`` that names its new path, every time (it is not kept, and ``__dir__`` leaves it out).
    """
    moved = moved or {}

    def __getattr__(name: str) -> object:
        if name in moved:
            warnings.warn(
                f"{package}.{name} has moved to {moved[name]}.{name}; import it from there (the old path goes in the "
                "next release)",
                FutureWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *sources})

    return __getattr__, __dir__
