"""Gathering one sharded MoE block for the duration of a probe: the weights FSDP2 sharded and, where the probe needs
the whole layer on one rank, the experts that expert parallelism split over ranks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn


@contextmanager
def gathered(module: nn.Module, all_experts: bool = True) -> Iterator[None]:
    """``module``'s weights on this rank while the context lasts, released on exit.

    Every FSDP2 group inside ``module`` is unsharded (``FSDPModule.unshard``) and resharded afterwards: the router,
    the shared experts and this rank's experts become whole. With ``all_experts``, a block with expert parallelism
    also lends every expert's weights (its ``all_experts()``). Both are collectives: every rank enters for the
    same modules in the same order. A module that is not sharded is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.unshard()
    try:
        with ExitStack() as stack:
            lend = getattr(module, "all_experts", None)
            if all_experts and callable(lend):
                stack.enter_context(lend())
            yield
    finally:
        for group in groups:
            group.reshard()
