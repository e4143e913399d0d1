"""Alignment of the experts' Jacobians (docs/geometry.md §4): of their mean Jacobians, and pointwise, token by
token, with the chance level of random matrices."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator, safe_div
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.mean_jacobian import (
    FactoredMeanJacobian,
    MeanJacobian,
    UnreadableWeights,
    warn_unreadable,
)
from moe_lightning.geometry.alignment import (
    alignment_chance,
    jacobian_alignment,
    offdiag_summary,
    pointwise_cosine_sums,
)
from moe_lightning.geometry.factored import factored_inner_products
from moe_lightning.geometry.operators import JacobianFactors
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["Alignment"]


class Alignment(Accumulator):
    """``|cos|`` between the experts' mean Jacobians, and its mean over tokens of the pointwise Jacobians.

    With factored experts (any D) both are exact without forming a Jacobian: the mean Jacobians' inner products
    from their factors (:class:`~moe_lightning.geometry.accumulators.mean_jacobian.FactoredMeanJacobians`), the
    pointwise ones as ``s_iᵀ K_ij s_j`` with the weights' ``F × F`` Gram ``K_ij`` of each pair of experts
    (:func:`~moe_lightning.geometry.factored.factored_inner_products`). On the exact path factored experts take the
    same pointwise inner products, so that no expert's Jacobian is formed at the tokens not routed to it (``E / k``
    times the Jacobians the spectra need, for top-``k`` routing); the mean Jacobians are the formed ones.

    Args:
        mean_jacobian: the mean Jacobians' accumulator.
        num_experts: E (at least 2).
        dim: D.
        pointwise_factors: on the exact path, compute the pointwise inner products from the experts' factors.
    """

    needs_all_token_jacobians = True

    def __init__(
        self,
        mean_jacobian: MeanJacobian | FactoredMeanJacobian,
        num_experts: int,
        dim: int,
        pointwise_factors: bool = False,
    ) -> None:
        self.mean_jacobian, self.num_experts, self.dim = mean_jacobian, num_experts, dim
        self.factored = isinstance(mean_jacobian, FactoredMeanJacobian)
        self.pointwise_factored = self.factored or pointwise_factors
        if self.pointwise_factored:
            self.needs_all_token_jacobians = False
        self._queue: list[list[JacobianFactors]] = []  # each queued chunk's factors, one per expert
        self._queued_bytes = 0

    def allocate(self, layout: BufferLayout) -> None:
        self.cos_sum = layout.allocate("alignment/pointwise_cos_sum", self.num_experts, self.num_experts)
        self.cos_count = layout.allocate("alignment/pointwise_count", self.num_experts, self.num_experts)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        if self.pointwise_factored:  # the factored path runs without expert parallelism (all experts are here)
            # The inner products' weight Grams (one F × F per pair of experts) do not depend on the tokens: chunks
            # are queued and run together, so that they are computed once per probe rather than once per chunk.
            factors = [chunk.all_token_factors(e) for e in range(self.num_experts)]
            self._queue.append(factors)
            self._queued_bytes += sum(f.scales_NGH.numel() * f.scales_NGH.element_size() for f in factors)
            if 4 * self._queued_bytes >= chunk.ctx.config.memory_budget_bytes:
                self._flush(buffer)
            return
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

    def _flush(self, buffer: Tensor) -> None:
        """Add the cosines of the queued chunks' tokens, in one call of
        :func:`~moe_lightning.geometry.factored.factored_inner_products`."""
        per_expert = zip(*self._queue, strict=True)
        factors = [replace(fs[0], scales_NGH=torch.cat([f.scales_NGH for f in fs])) for fs in per_expert]
        self._queue, self._queued_bytes = [], 0
        s, c = _cosine_sums_from_inner_products(factored_inner_products(factors))
        self.cos_sum.of(buffer).add_(s)
        self.cos_count.of(buffer).add_(c)

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        if self._queue:
            self._flush(buffer)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        chance = alignment_chance(self.dim, self.dim)
        P = safe_div(self.cos_sum.of(buffer), self.cos_count.of(buffer))
        if self.factored:
            try:
                A = _cosines_from_gram(done[self.mean_jacobian].gram())
            except UnreadableWeights as error:
                warn_unreadable(report.name, "the mean-Jacobian alignment", error)
                A = torch.full_like(P, math.nan)
                report.variants["align"] = "unavailable_weights_not_readable_at_finalize"
        else:
            A = jacobian_alignment(self.mean_jacobian.sum_wJ.of(buffer))
        report.matrices["align_mean_jacobian"] = A
        report.matrices["align_pointwise"] = P
        for key, M in (("align", A), ("palign", P)):
            mean_off, max_off = offdiag_summary(M)
            report.layer[f"{key}_mean_offdiag"] = mean_off
            report.layer[f"{key}_max_offdiag"] = max_off
            report.layer[f"{key}_ratio"] = mean_off / chance
        report.layer["align_chance"] = chance
        v = report.variants
        suffix = "_exact_factored" if self.factored else ""
        v.setdefault("align", f"mean_jacobian_abs_frobenius_cosine{suffix}")
        v["palign"] = f"pointwise_abs_frobenius_cosine_all_probe_tokens{suffix}"
        v["align_chance"] = "exact_gaussian_E_abs_cos_n=d*d"
        if v["align"].startswith("unavailable"):
            for key in ("align_mean_offdiag", "align_max_offdiag", "align_ratio"):
                report.layer.pop(key)
            report.matrices.pop("align_mean_jacobian")


def _cosines_from_gram(gram_EE: Tensor) -> Tensor:
    """``|G_ij| / sqrt(G_ii G_jj)``, NaN where a norm is zero: :func:`~moe_lightning.geometry.jacobian_alignment`
    from the inner products instead of the matrices."""
    norms = gram_EE.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    ok = denom > 0
    cos = gram_EE.abs() / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, cos.clamp_max(1.0), torch.full_like(cos, math.nan))


def _cosine_sums_from_inner_products(inner_NEE: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~moe_lightning.geometry.pointwise_cosine_sums` from each token's inner products."""
    cos_NEE = _cosines_from_gram(inner_NEE)
    ok = torch.isfinite(cos_NEE)
    return torch.where(ok, cos_NEE, torch.zeros_like(cos_NEE)).sum(0), ok.sum(0).to(cos_NEE.dtype)
