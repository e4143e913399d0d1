"""Lending a module cast copies of its weights while a function runs, so that a probe computes in float64 on a
float32 model without writing a parameter (docs/callbacks.md "Observation only")."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.geometry.view import MoEView

__all__ = ["lent_modules", "with_cast_copies"]


class _Call(nn.Module):
    """Holds ``module`` so that :func:`torch.func.functional_call` can lend it other tensors while ``fn`` runs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


def lent_modules(views: MoEView | Sequence[MoEView]) -> list[nn.Module]:
    """The modules whose weights the views' functions read: each view's ``module``, and the modules a view names in
    an optional ``weight_modules`` attribute (a :class:`~moe_lightning.adapters.CallableView` whose functions read
    modules outside its ``module``); modules inside another of them are left out (their weights are lent with it)."""
    found: list[nn.Module] = []
    for view in [views] if isinstance(views, MoEView) else views:
        for module in (view.module, *getattr(view, "weight_modules", ())):
            if isinstance(module, nn.Module) and not any(module is m for m in found):
                found.append(module)
    return [m for m in found if not any(other is not m and _contains(other, m) for other in found)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(sub is inner for sub in outer.modules())


def with_cast_copies(
    module: nn.Module | Sequence[nn.Module] | None,
    dtype: torch.dtype | None,
    fn: Callable[[], Any],
    *,
    skip: Collection[Tensor] = (),
) -> Any:
    """``fn()`` while ``module`` (or each of several modules) reads detached copies of its floating parameters and
    buffers cast to ``dtype``; the tensors in ``skip`` are not lent (``fn`` casts what it reads of them itself, as a
    view does with one expert's slice of stacked expert weights, which a copy would hold whole).

    The copies are lent through :func:`torch.func.functional_call`, which swaps them into the module's parameter
    and buffer slots and puts the originals back; no parameter's ``.data``, dtype or device ever changes. Changing
    a parameter's dtype through ``.data``, even for a moment, replaces the gradient-accumulation node on which DDP
    hangs its all-reduce, and the ranks stop averaging that parameter from then on. ``dtype=None`` (or a module
    already in ``dtype``) runs ``fn`` on the module as it is.
    """
    if not isinstance(module, nn.Module) and module is not None:
        module = nn.ModuleList(list(module)) if len(module) > 1 else (module[0] if module else None)
    if not isinstance(module, nn.Module) or dtype is None:
        return fn()
    skipped = {id(t) for t in skip}
    copies = {
        name: t.detach().to(dtype)
        for name, t in itertools.chain(
            module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
        )
        if t.is_floating_point() and t.dtype != dtype and id(t) not in skipped
    }
    if not copies:
        return fn()
    return torch.func.functional_call(_Call(module), {f"module.{k}": v for k, v in copies.items()}, (fn,))
