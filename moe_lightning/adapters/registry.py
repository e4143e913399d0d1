"""Find the MoE layers of any model: ``find_moe_layers(model) -> list[MoEView]``.

Adapters are registered as ``(match, factory)`` pairs. ``find_moe_layers`` walks ``model.named_modules()`` in
model order; the first adapter whose ``match(module)`` is true turns that module into one or more views (a block's
shared experts are entries of their own), and the walk does not descend into a matched module.

A factory that cannot view a matched module (it looks like an MoE block, but its views would not be exact) raises
:class:`BlockNotViewable`; :func:`scan_moe_layers` lists such modules as :class:`SkippedLayer` entries, and
:func:`find_moe_layers` warns once with one line per skipped module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from torch import nn

from moe_lightning.common import warn_once
from moe_lightning.geometry import MoEView

Matcher = Callable[[nn.Module], bool]
Factory = Callable[[str, nn.Module], list[MoEView]]

_ADAPTERS: list[tuple[str, Matcher, Factory]] = []


class BlockNotViewable(Exception):
    """Raised by an adapter's factory for a module that looks like an MoE block but cannot be viewed exactly; the
    message says why in one line."""


@dataclass(frozen=True)
class SkippedLayer:
    """A module that looks like an MoE block but has no views.

    Attributes:
        name: its path in the model.
        class_name: its class.
        adapter: the adapter that matched it.
        reason: why it cannot be viewed, one line.
    """

    name: str
    class_name: str
    adapter: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name or '<root>'} ({self.class_name}): {self.reason}"


@dataclass(frozen=True)
class LayerScan:
    """What :func:`scan_moe_layers` found: the views, and the MoE-looking modules it skipped."""

    views: list[MoEView] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    def matching(self, layers: str | Iterable[str]) -> LayerScan:
        """The views and skipped modules whose name matches one of ``layers`` (names or glob patterns)."""
        patterns = [layers] if isinstance(layers, str) else list(layers)

        def matches(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        return LayerScan([v for v in self.views if matches(v.name)], [s for s in self.skipped if matches(s.name)])


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


def scan_moe_layers(
    model: nn.Module,
    layers: str | Iterable[str] | None = None,
    context: Callable[[nn.Module], AbstractContextManager[object]] | None = None,
) -> LayerScan:
    """All MoE layers of ``model`` as :class:`MoEView` objects in model order, and the MoE-looking modules skipped.

    Args:
        model: any ``nn.Module``.
        layers: keep only views (and skipped modules) whose name matches one of these names or glob patterns
            (``"blocks.*.ffn"``); None keeps all.
        context: ``context(module)`` is entered around the factory of each matched module, which reads its weights
            (the adapters' self-checks run the block): a model dispatched with ``accelerate`` keeps an offloaded
            block's weights on the meta device until something brings them onto its execution device.
    """
    views: list[MoEView] = []
    skipped: list[SkippedLayer] = []
    matched_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(p == "" or path == p or path.startswith(p + ".") for p in matched_prefixes):
            continue
        for adapter, match, factory in _ADAPTERS:
            if match(module):
                name = uncompiled_name(path)
                try:
                    with context(module) if context is not None else nullcontext():
                        views.extend(factory(name, module))
                except BlockNotViewable as reason:
                    skipped.append(SkippedLayer(name, type(module).__name__, adapter, str(reason)))
                matched_prefixes.append(path)
                break
    scan = LayerScan(views, skipped)
    return scan if layers is None else scan.matching(layers)


def uncompiled_name(path: str) -> str:
    """A module path without the ``_orig_mod`` steps that ``torch.compile`` adds (``_orig_mod.blocks.0.ffn`` ->
    ``blocks.0.ffn``), so that a layer's keys are the same whether or not the model was compiled."""
    return ".".join(part for part in path.split(".") if part != "_orig_mod")


def skipped_text(skipped: Iterable[SkippedLayer]) -> str:
    """One line per skipped module, for warnings and error messages."""
    return "\n".join(f"  {s}" for s in skipped)


def find_moe_layers(model: nn.Module, layers: str | Iterable[str] | None = None) -> list[MoEView]:
    """All MoE layers of ``model`` as :class:`MoEView` objects, in model order.

    Modules that look like MoE blocks but cannot be viewed exactly are left out, with one warning (once per
    message) that names each, its class and why; :func:`scan_moe_layers` returns them as data.

    Args:
        model: any ``nn.Module``.
        layers: keep only views whose name matches one of these names or glob patterns (``"blocks.*.ffn"``);
            None keeps all.
    """
    scan = scan_moe_layers(model, layers)
    warn_skipped("find_moe_layers", scan.skipped)
    return scan.views


def warn_skipped(caller: str, skipped: list[SkippedLayer]) -> None:
    """One warning (once per message) naming each skipped module, its class and why; nothing when there is none."""
    if skipped:
        count = len(skipped)
        warn_once(f"{caller}: {count} module(s) look like MoE blocks but are not probed:\n" + skipped_text(skipped))
