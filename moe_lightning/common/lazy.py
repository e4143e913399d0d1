"""A package's names imported on first use, so that importing the package (and ``--help``) stays cheap."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_names(package: str, sources: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: ``sources[name]`` is the submodule that defines
    ``name``; it is imported when ``name`` is first read, and the name is then kept in the package."""

    def __getattr__(name: str) -> object:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *sources})

    return __getattr__, __dir__
