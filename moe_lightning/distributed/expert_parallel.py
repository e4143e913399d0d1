"""Expert parallelism: the token exchange that lets each of P ranks hold E/P of an MoE layer's experts.

Shape legend: ``P`` ranks of the expert-parallel group, ``L = E / P`` experts per rank, ``A`` this rank's
(token, expert) assignments sorted by global expert, ``R`` assignments this rank receives for its own experts.

The exchange follows torchtitan's ``ExpertParallel`` and Megatron-core's ``alltoall`` dispatcher:

1. the per-expert counts go to every rank in one ``all_to_all_single`` (``(P * L,)`` integers each way), so each
   rank knows how many rows it receives from every other rank for each of its experts;
2. the assignment rows go to their experts' ranks in one ``all_to_all_single`` with uneven splits (dropless);
3. the received rows, ordered by source rank then local expert, are permuted to local-expert-major order, the
   layout the dispatch paths (``sorted``, ``grouped``) take, and permuted back after the experts ran;
4. the outputs return with the reverse ``all_to_all_single``.

Steps 2 and 4 go through torch's differentiable ``all_to_all_single_autograd`` (as torchtitan does), whose backward
is the reverse exchange, so the gradients of the inputs and of the local experts are exact.

:func:`shard_experts` splits a layer's experts over the ranks, :func:`gather_experts` lends every expert to one rank
for a while (the probes that need the whole layer), and :func:`summed_over` sums the routed loads for the balance
loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moe_lightning.nn.experts import GroupedExperts
    from moe_lightning.nn.layer import MoELayer

__all__ = ["ExpertExchange", "gather_experts", "plan_exchange", "shard_experts", "summed_over"]


@dataclass
class ExpertExchange:
    """How one batch's assignments travel to the experts' ranks and back."""

    group: dist.ProcessGroup
    send_splits: list[int]  # (P,) rows this rank sends to each rank
    recv_splits: list[int]  # (P,) rows this rank receives from each rank
    local_counts: Tensor  # (L,) rows per local expert after the exchange, all source ranks together
    order: Tensor  # (R,) received rows in local-expert-major order: ``x_recv[order]``

    def dispatch(self, x_AD: Tensor) -> Tensor:
        """This rank's assignment rows (sorted by global expert) -> the rows of its own experts, ``(R, D)``, grouped
        by local expert."""
        x_RD = _all_to_all(x_AD, self.recv_splits, self.send_splits, self.group)
        return x_RD[self.order]

    def combine(self, y_RD: Tensor) -> Tensor:
        """The local experts' outputs ``(R, D)`` -> this rank's assignment rows, in the order ``dispatch`` took."""
        unpermuted = torch.empty_like(y_RD).index_copy(0, self.order, y_RD)
        return _all_to_all(unpermuted, self.send_splits, self.recv_splits, self.group)


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return torch.ops._c10d_functional.wait_tensor(out)


def plan_exchange(counts_E: Tensor, group: dist.ProcessGroup) -> ExpertExchange:
    """The exchange for assignments with per-expert counts ``counts_E`` (global experts, this rank's tokens).

    Expert ``e`` lives on rank ``e // L`` of ``group``. One collective (the counts) and one host synchronisation
    (the split sizes, which ``all_to_all_single`` takes as Python lists).
    """
    world = dist.get_world_size(group)
    num_local = counts_E.numel() // world
    recv_counts_PL = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts_PL, counts_E.contiguous(), group=group)
    recv_counts_PL = recv_counts_PL.view(world, num_local)  # rows from rank s for my local expert l
    send_splits = counts_E.view(world, num_local).sum(1).tolist()
    recv_splits = recv_counts_PL.sum(1).tolist()
    # Received rows come source-major; a stable sort on the local expert makes them expert-major, source-minor.
    chunk_expert = torch.arange(num_local, device=counts_E.device).repeat(world)  # (P * L,) local expert per chunk
    expert_R = torch.repeat_interleave(chunk_expert, recv_counts_PL.reshape(-1))
    order = torch.argsort(expert_R, stable=True)
    return ExpertExchange(group, send_splits, recv_splits, recv_counts_PL.sum(0), order)


def shard_experts(layer: MoELayer, mesh: DeviceMesh) -> None:
    """Expert parallelism for ``layer`` over the 1-D ``DeviceMesh`` ``mesh`` of P ranks, in place: rank r keeps
    experts ``[r E/P, (r+1) E/P)`` as the local shard of ``DTensor`` weights (``Shard(0)``); every rank keeps the
    router.

    Each rank routes its own tokens; the assignments go to their experts' ranks and come back with
    ``all_to_all_single`` (dropless, uneven splits), forward and backward. The balance loss then uses the loads
    summed over ``mesh`` (``layer.load_group``, which a caller may widen to every data-parallel rank), so the mean
    of the ranks' losses is the loss of their tokens together. A capacity limit applies to each rank's tokens.

    The expert gradients a backward pass leaves are sums over the group's ranks of each rank's loss, as for any
    parameter before the data-parallel mean; FSDP2 (:func:`moe_lightning.distributed.layout.parallelize`)
    divides them.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    size = mesh.size()
    if mesh.ndim != 1:
        raise ValueError(f"shard_experts: mesh must be 1-D (the expert-parallel ranks), got {mesh.ndim} dims")
    if layer.num_experts % size:
        raise ValueError(
            f"num_experts={layer.num_experts} must be divisible by the expert-parallel size {size} "
            f"(allowed sizes: divisors of {layer.num_experts})"
        )
    if layer.config.dispatch == "bmm":
        raise ValueError(
            "dispatch='bmm' runs every expert on every token and cannot shard the experts; use 'auto', "
            "'sorted', 'grouped' or 'loop' under expert parallelism"
        )
    for name in ("w_in", "w_out"):
        weight = getattr(layer, name)
        setattr(layer, name, nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)])))
    layer.expert_group = mesh.get_group()
    if layer.load_group is None:
        layer.load_group = layer.expert_group


@contextmanager
def gather_experts(experts: GroupedExperts) -> Iterator[None]:
    """Every expert's weights on this rank while the context lasts (``DTensor.full_tensor``, a collective every rank
    of the expert group enters), so ``experts.expert_fn`` takes any expert; nothing to do without expert
    parallelism. The copies hold no gradient and are freed on exit."""
    if experts.expert_group is None:
        yield
        return
    with torch.no_grad():
        experts.all_weights = (experts.w_in.full_tensor(), experts.w_out.full_tensor())
    try:
        yield
    finally:
        experts.all_weights = None


def summed_over(load_E: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``load_E`` summed over the ranks of ``group`` (itself without one); no gradient flows through loads."""
    if group is None:
        return load_E
    total = load_E.detach().clone()
    dist.all_reduce(total, group=group)
    return total
