"""One rank's statistics of one MoE layer, and gathering a sharded MoE block for the duration of its probe: the weights
FSDP2 sharded and, where the probe needs the whole layer on one rank, the experts that expert parallelism split over
ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lightning.common import is_fsdp_module
from moe_lightning.geometry import MoEView, ProbeConfig, probe_statistics
from moe_lightning.geometry.view import ExpertPlacement, HasPlacement
from moe_lightning.monitors.health import nonfinite_weights
from moe_lightning.monitors.probe_set import bootstrap_columns
from moe_lightning.monitors.ranks import Ranks


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


def layer_statistics(
    model: nn.Module,
    view: MoEView,
    x: Tensor | None,
    capture_error: BaseException | None,
    ranks: Ranks,
    config: ProbeConfig,
) -> Any:
    """This rank's statistics of one layer on its captured inputs ``x`` (every rank's probe tokens), or the exception
    that stopped them (a probe must never stop training; the monitor agrees it over ranks and reports it).

    Each rank probes its share of the tokens; under expert parallelism the ranks of an expert group probe their
    shares together, each with its own experts. Under FSDP2 the layer's weights are gathered while it is probed (a
    collective every rank enters, even one whose capture failed); under expert parallelism each rank's own experts,
    or all of them where a quantity needs the whole layer on one rank.
    """
    rank, world = ranks.rank, ranks.world_size
    placement, all_experts = expert_layout(view, config)
    lend = placement.gather_all if placement is not None and all_experts else None
    try:
        with gathered(view.module, lend_experts=lend, root=model):
            nonfinite = nonfinite_weights(view.module)  # named as weights, not as the tokens it would drop
            if nonfinite is not None:
                return nonfinite
            if capture_error is not None or x is None:
                return capture_error or KeyError(f"no inputs captured for {view.name!r}")
            split = placement is not None and not all_experts
            group_ranks = dist.get_process_group_ranks(placement.group) if split else [rank]
            shard = torch.cat([x.tensor_split(world)[r] for r in group_ranks]) if world > 1 else x
            counts = bootstrap_columns(config, x.reshape(-1, x.shape[-1]).shape[0], world, group_ranks)
            where = {"expert_group": placement.group, "local_experts": placement.local_experts} if split else {}
            return probe_statistics(view, shard, config, resample_counts=counts, **where)
    except Exception as error:
        return error
