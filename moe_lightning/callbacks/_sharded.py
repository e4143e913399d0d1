"""Gathering one sharded MoE block for the duration of a probe: the weights FSDP2 sharded, and the experts that
expert parallelism split over ranks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """``module``'s full weights on this rank while the context lasts, released on exit.

    Every FSDP2 group inside ``module`` is unsharded (``FSDPModule.unshard``) and resharded afterwards, and a block
    with expert parallelism lends every expert's weights (its ``all_experts()``). Both are collectives: every rank
    enters for the same modules in the same order. A module that is not sharded is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.unshard()
    try:
        with ExitStack() as stack:
            all_experts = getattr(module, "all_experts", None)
            if callable(all_experts):
                stack.enter_context(all_experts())
            yield
    finally:
        for group in groups:
            group.reshard()
