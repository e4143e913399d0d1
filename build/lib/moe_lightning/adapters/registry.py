"""Find the MoE layers of any model: ``find_moe_layers(model) -> list[MoEView]``.

Adapters are registered as ``(match, factory)`` pairs. ``find_moe_layers`` walks ``model.named_modules()`` in
model order; the first adapter whose ``match(module)`` is true turns that module into one or more views (Qwen2-MoE
reports its shared expert as an entry of its own), and the walk does not descend into a matched module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from moe_lightning.adapters.base import MoEView

Matcher = Callable[[nn.Module], bool]
Factory = Callable[[str, nn.Module], list[MoEView]]

_ADAPTERS: list[tuple[str, Matcher, Factory]] = []


def register_adapter(name: str, match: Matcher, factory: Factory, *, first: bool = False) -> None:
    """Teach :func:`find_moe_layers` a new kind of MoE block.

    Args:
        name: a label for error messages and :func:`registered_adapters`.
        match: returns True for a module this adapter handles.
        factory: ``factory(module_path, module)`` returns the views for that module.
        first: put this adapter before the built-in ones, so it wins over them.
    """
    entry = (name, match, factory)
    if first:
        _ADAPTERS.insert(0, entry)
    else:
        _ADAPTERS.append(entry)


def registered_adapters() -> list[str]:
    """Names of the registered adapters, in matching order."""
    return [name for name, _, _ in _ADAPTERS]


def find_moe_layers(model: nn.Module, layers: str | Iterable[str] | None = None) -> list[MoEView]:
    """All MoE layers of ``model`` as :class:`MoEView` objects, in model order.

    Args:
        model: any ``nn.Module``.
        layers: keep only views whose name matches one of these names or glob patterns (``"blocks.*.ffn"``);
            None keeps all.
    """
    views: list[MoEView] = []
    matched_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(p == "" or path == p or path.startswith(p + ".") for p in matched_prefixes):
            continue
        for _, match, factory in _ADAPTERS:
            if match(module):
                views.extend(factory(path, module))
                matched_prefixes.append(path)
                break
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        views = [v for v in views if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    return views
