"""The gate-weighted mean Jacobian ``Σ w J_e`` of each expert (docs/geometry.md §4–5), shared by the alignment and
the functional subspaces."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator
from moe_lightning.geometry.accumulators.context import Chunk
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["MeanJacobian"]


class MeanJacobian(Accumulator):
    """``Σ_n w_n J_e(x_n)`` over each expert's routed tokens, ``(E, D, D)`` (exact path only).

    Args:
        num_experts: E.
        dim: D.
    """

    def __init__(self, num_experts: int, dim: int) -> None:
        self.num_experts, self.dim = num_experts, dim

    def allocate(self, layout: BufferLayout) -> None:
        self.sum_wJ = layout.allocate("mean_jacobian/sum_wJ", self.num_experts, self.dim, self.dim, resampled=True)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        sum_wJ = self.sum_wJ.of(buffer)
        for e in chunk.ctx.experts_here:
            w, J = chunk.weights(e), chunk.jacobian(e)
            sum_wJ[e] += torch.einsum("n,nij->ij", w, J)
            c = chunk.counts_of(e)
            if c is not None:
                chunk.ctx.add_resampled(buffer, self.sum_wJ, c * w, J, index=e)
