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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

__all__ = ["ExpertExchange", "plan_exchange"]


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
