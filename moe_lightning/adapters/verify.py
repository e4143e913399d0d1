"""Checking the views of a model's MoE layers on their captured tokens before any value of them is trusted: the
one check that the monitors and the pretrained probe share (:func:`~moe_lightning.geometry.verify_view` does the
work; this module finds every view of each layer and checks each layer once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch
from torch import Tensor

from moe_lightning.adapters.registry import scan_moe_layers
from moe_lightning.geometry import MoEView
from moe_lightning.geometry.verify import CHECKS, TOLERANCE, ViewCheck, verify_view

__all__ = ["check_views", "views_of_layer"]


def views_of_layer(view: MoEView, views: Sequence[MoEView]) -> list[MoEView]:
    """Every view of ``view``'s layer, whose gated sums add up to its output: those of ``views`` with the same module
    or, where the adapters give the module more views (its shared experts, left out by a ``layers`` filter), those."""
    given = [v for v in views if v.module is view.module]
    try:
        found = [v for v in scan_moe_layers(view.module).views if v.module is view.module]
    except Exception:  # a module no adapter views on its own (a hand-made view): the views given are all there is
        found = []
    return found if len(found) > len(given) else given


def check_views(
    views: Sequence[MoEView],
    captured: dict[str, Tensor],
    dtype: torch.dtype | None = None,
    context: Callable[[MoEView], AbstractContextManager[None]] | None = None,
) -> dict[str, ViewCheck]:
    """The :class:`~moe_lightning.geometry.verify.ViewCheck` of each view, by name, on its captured tokens.

    Views of one layer are checked together, once (their gated sums add up to the layer's output), and share the
    result. Never raises: an error becomes a failed check that names it.

    Args:
        views: the views to check, in model order.
        captured: each view's captured layer input, by view name.
        dtype: the dtype the probe computes in; None, the layer's own.
        context: ``context(view)`` is entered around the check of ``view``'s layer (the monitors gather a sharded
            layer's weights in it); the same order of views on every rank.
    """
    checks: dict[str, ViewCheck] = {}
    for view in views:
        if view.name in checks:
            continue
        layer = [v for v in views if v.module is view.module]
        names = ", ".join(str(v.name) for v in layer)
        try:
            with context(view) if context is not None else nullcontext():
                check = verify_view(views_of_layer(view, views), captured[view.name], dtype)
            check = replace(check, layer=names)
        except Exception as error:
            check = ViewCheck(
                names, CHECKS[0], float("nan"), TOLERANCE[torch.float32], f"{type(error).__name__}: {error}"
            )
        for v in layer:
            checks[v.name] = check
    return checks
