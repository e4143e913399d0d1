"""Gathering one sharded MoE block for the duration of a probe: the weights FSDP2 sharded and, where the probe needs
the whole layer on one rank, the experts that expert parallelism split over ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

from torch import nn

from moe_lightning.common import is_fsdp_module
from moe_lightning.geometry import MoEView, ProbeConfig
from moe_lightning.geometry.view import ExpertPlacement, HasPlacement


def expert_layout(view: MoEView, config: ProbeConfig) -> tuple[ExpertPlacement | None, bool]:
    """``(placement, all_experts)`` for probing ``view``: where its experts live if expert parallelism splits them
    (its ``placement()``), else None; and whether the probe must gather every expert instead, for a split layer
    whose probe needs the whole layer on one rank (``layer_jacobian_method="func"``)."""
    placement = view.placement() if isinstance(view, HasPlacement) else None
    if placement is None:
        return None, False
    return placement, bool(config.layer_jacobian and config.layer_jacobian_method == "func")


@contextmanager
def gathered(
    module: nn.Module,
    lend_experts: Callable[[], AbstractContextManager[None]] | None = None,
    root: nn.Module | None = None,
) -> Iterator[None]:
    """``module``'s weights on this rank while the context lasts, released on exit.

    Every FSDP2 group inside ``module`` is unsharded (``FSDPModule.unshard``) and resharded afterwards: the router,
    the shared experts and this rank's experts become whole. Where ``module`` is not a group of its own, its own
    weights belong to the innermost group of ``root`` (the whole model) that holds it, a block of a model that
    FSDP2 sharded block by block: that group is unsharded too. ``lend_experts`` (a view's
    ``placement().gather_all``) also lends every expert of a block that expert parallelism split. All are
    collectives: every rank enters for the same modules in the same order. A module that is not sharded is left as
    it is.
    """
    groups = [m for m in module.modules() if is_fsdp_module(m)]
    if root is not None and not is_fsdp_module(module):
        owner = None
        for candidate in root.modules():  # pre-order: a later group that holds module is nested in an earlier one
            if is_fsdp_module(candidate) and any(sub is module for sub in candidate.modules()):
                owner = candidate
        if owner is not None:
            groups.insert(0, owner)
    for group in groups:
        group.unshard()
    try:
        with ExitStack() as stack:
            if lend_experts is not None:
                stack.enter_context(lend_experts())
            yield
    finally:
        for group in groups:
            group.reshard()
