"""Alignment of the experts' Jacobians (docs/geometry.md §4): of their mean Jacobians, and pointwise, token by
token, with the chance level of random matrices."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator, safe_div
from moe_lightning.geometry.accumulators.context import Chunk
from moe_lightning.geometry.accumulators.mean_jacobian import MeanJacobian
from moe_lightning.geometry.alignment import (
    alignment_chance,
    jacobian_alignment,
    offdiag_summary,
    pointwise_cosine_sums,
)
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["Alignment"]


class Alignment(Accumulator):
    """``|cos|`` between the experts' mean Jacobians, and its mean over tokens of the pointwise Jacobians.

    Args:
        mean_jacobian: the mean Jacobians' accumulator.
        num_experts: E (at least 2).
        dim: D.
    """

    needs_all_token_jacobians = True

    def __init__(self, mean_jacobian: MeanJacobian, num_experts: int, dim: int) -> None:
        self.mean_jacobian, self.num_experts, self.dim = mean_jacobian, num_experts, dim

    def allocate(self, layout: BufferLayout) -> None:
        self.cos_sum = layout.allocate("alignment/pointwise_cos_sum", self.num_experts, self.num_experts)
        self.cos_count = layout.allocate("alignment/pointwise_count", self.num_experts, self.num_experts)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        # Under expert parallelism each rank forms its experts' Jacobians at every token; the cosines of a token
        # need all of them, gathered, and each rank takes its share of the tokens.
        ctx, here = chunk.ctx, chunk.ctx.experts_here
        J_NEOI = ctx.gather_over_experts(
            lambda: torch.stack([chunk.all_token_jacobian(e) for e in here], 1),
            (chunk.num_tokens, len(here), ctx.dim, ctx.dim),
        )
        s, c = pointwise_cosine_sums(J_NEOI[ctx.token_share(chunk.num_tokens)])
        self.cos_sum.of(buffer).add_(s)
        self.cos_count.of(buffer).add_(c)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        chance = alignment_chance(self.dim, self.dim)
        A = jacobian_alignment(self.mean_jacobian.sum_wJ.of(buffer))
        P = safe_div(self.cos_sum.of(buffer), self.cos_count.of(buffer))
        report.matrices["align_mean_jacobian"] = A
        report.matrices["align_pointwise"] = P
        for key, M in (("align", A), ("palign", P)):
            mean_off, max_off = offdiag_summary(M)
            report.layer[f"{key}_mean_offdiag"] = mean_off
            report.layer[f"{key}_max_offdiag"] = max_off
            report.layer[f"{key}_ratio"] = mean_off / chance
        report.layer["align_chance"] = chance
        v = report.variants
        v["align"] = "mean_jacobian_abs_frobenius_cosine"
        v["palign"] = "pointwise_abs_frobenius_cosine_all_probe_tokens"
        v["align_chance"] = "exact_gaussian_E_abs_cos_n=d*d"
