"""Alignment of the experts' Jacobians (docs/geometry.md §4): of their mean Jacobians, and pointwise, token by
token, with the chance level of random matrices."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moe_lightning.common import dtype_name
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
    sampled_pairs_summary,
)
from moe_lightning.geometry.factored import pointwise_cosine_sums_factored
from moe_lightning.geometry.operators import JacobianFactors
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["Alignment"]


class Alignment(Accumulator):
    """``|cos|`` between the experts' mean Jacobians, and its mean over tokens of the pointwise Jacobians.

    With factored experts (any D) both are exact without forming a Jacobian: the mean Jacobians' inner products
    from their factors (:class:`~moe_lightning.geometry.accumulators.mean_jacobian.FactoredMeanJacobians`), the
    pointwise ones as ``s_iᵀ K_ij s_j`` with the weights' ``F × F`` Gram ``K_ij`` of each pair of experts
    (:func:`~moe_lightning.geometry.factored.pointwise_cosine_sums_factored`). A Gram costs ``O(D·F²)``, far more
    than applying it to a token's scales, so the tokens of every chunk are kept (``D`` numbers each) and each Gram
    is formed once for all of them when the probe closes, not once per chunk. On the exact path factored experts take
    the same pointwise inner products, so that no expert's Jacobian is formed at the tokens not routed to it (``E /
    k`` times the Jacobians the spectra need, for top-``k`` routing); the mean Jacobians are the formed ones.

    Args:
        mean_jacobian: the mean Jacobians' accumulator.
        num_experts: E (at least 2).
        dim: D.
        pointwise: whether to compute the pointwise alignment too (``ProbeConfig.pointwise_alignment``).
        pointwise_factors: on the exact path, compute the pointwise inner products from the experts' factors.
        pairs: ``(E, E)`` mask of the sampled pairs of the pointwise alignment
            (:func:`~moe_lightning.geometry.alignment.sampled_pairs`); None: every pair.
        gram_dtype: the dtype the factored pointwise Grams' products round in (None: the probe's); the probe passes
            the matrix-free products' dtype on a sample of the pairs, whose mean is an estimate with a standard error
            over pairs (docs/geometry.md §4, "On a sample of the pairs").
    """

    def __init__(
        self,
        mean_jacobian: MeanJacobian | FactoredMeanJacobian,
        num_experts: int,
        dim: int,
        pointwise: bool = True,
        pointwise_factors: bool = False,
        pairs: Tensor | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        self.mean_jacobian, self.num_experts, self.dim = mean_jacobian, num_experts, dim
        self.pairs, self.gram_dtype = pairs, gram_dtype
        self.factored = isinstance(mean_jacobian, FactoredMeanJacobian)
        self.pointwise = pointwise
        self.pointwise_factored = self.factored or pointwise_factors
        self.needs_all_token_jacobians = pointwise and not self.pointwise_factored

        self._pending_x: list[Tensor] = []  # factored path: the chunks' tokens, until close

    def allocate(self, layout: BufferLayout) -> None:
        if self.pointwise:
            self.cos_sum = layout.allocate("alignment/pointwise_cos_sum", self.num_experts, self.num_experts)
            self.cos_count = layout.allocate("alignment/pointwise_count", self.num_experts, self.num_experts)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        if not self.pointwise:
            return
        if self.pointwise_factored:  # the factored path runs without expert parallelism (all experts are here)
            self._pending_x.append(chunk.x)
            ctx = chunk.ctx
            # Bounded memory: the kept tokens, and the scales of a pair of experts at them in close().
            per_token = ctx.dtype.itemsize * (ctx.dim + 2 * ctx.factor_width)
            if sum(x.shape[0] for x in self._pending_x) * per_token >= ctx.config.memory_budget_bytes:
                self._flush(ctx, buffer)
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

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        if self._pending_x:
            self._flush(ctx, buffer)

    def _flush(self, ctx: ProbeContext, buffer: Tensor) -> None:
        """Add the cosine sums of the kept tokens, each pair's Gram formed once for all of them."""
        x_ND = torch.cat(self._pending_x)
        self._pending_x.clear()

        def factors(e: int, x: Tensor) -> JacobianFactors:
            # Every expert's weights are read here, some several times, each with its cast copy and activations:
            # the freed pages go back between them (a Qwen3-sized layer peaked 2 GiB higher in this step without).
            ctx.release()
            return ctx.expert_factors(e, x)

        s, c = pointwise_cosine_sums_factored(
            lambda e: factors(e, x_ND),
            self.num_experts,
            x_ND.shape[0],
            ctx.config.memory_budget_bytes,
            self.pairs,
            gram_dtype=self.gram_dtype,
        )
        self.cos_sum.of(buffer).add_(s)
        self.cos_count.of(buffer).add_(c)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        chance = alignment_chance(self.dim, self.dim)
        suffix = "_exact_factored" if self.factored else ""
        A = self._mean_jacobian_alignment(buffer, report, done)
        if A is not None:
            report.matrices["align_mean_jacobian"] = A
            mean_off, max_off = offdiag_summary(A)
            report.layer.update(align_mean_offdiag=mean_off, align_max_offdiag=max_off, align_ratio=mean_off / chance)
            report.variants.setdefault("align", f"mean_jacobian_abs_frobenius_cosine{suffix}")
        if self.pointwise:
            self._pointwise_alignment(buffer, report, chance, suffix)
        report.layer["align_chance"] = chance
        report.variants["align_chance"] = "exact_gaussian_E_abs_cos_n=d*d"

    def _mean_jacobian_alignment(self, buffer: Tensor, report: GeometryReport, done: dict) -> Tensor | None:
        """The mean Jacobians' ``E × E`` alignment; None (with a warning and the variant saying why) when the
        factored experts' weights cannot be read at finalize."""
        if not self.factored:
            return jacobian_alignment(self.mean_jacobian.sum_wJ.of(buffer))
        try:
            return _cosines_from_gram(done[self.mean_jacobian].gram())
        except UnreadableWeights as error:
            warn_unreadable(report.name, "the mean-Jacobian alignment", error)
            report.variants["align"] = "unavailable_weights_not_readable_at_finalize"
            return None

    def _pointwise_alignment(self, buffer: Tensor, report: GeometryReport, chance: float, suffix: str) -> None:
        """The pointwise alignment's matrix and summaries: over every pair, or over the sampled pairs (the others
        NaN; the mean an estimate with its standard error over pairs, the maximum of a sample left out)."""
        P = safe_div(self.cos_sum.of(buffer), self.cos_count.of(buffer))
        variant = f"pointwise_abs_frobenius_cosine_all_probe_tokens{suffix}"
        if self.pairs is None:
            mean_off, max_off = offdiag_summary(P)
            report.layer.update(palign_mean_offdiag=mean_off, palign_max_offdiag=max_off)
        else:
            P = torch.where(self.pairs.to(P.device), P, torch.full_like(P, math.nan))
            mean_off, se = sampled_pairs_summary(P, self.pairs)
            report.layer.update(palign_mean_offdiag_se=se, palign_ratio_se=se / chance, palign_mean_offdiag=mean_off)
            e, sampled = self.num_experts, int(torch.triu(self.pairs, diagonal=1).sum())
            variant += f"_sampled_pairs={sampled}_of_{e * (e - 1) // 2}"
            if self.gram_dtype is not None:
                variant += f"_grams_{dtype_name(self.gram_dtype)}"
        report.matrices["align_pointwise"] = P
        report.layer["palign_ratio"] = mean_off / chance
        report.variants["palign"] = variant


def _cosines_from_gram(gram_EE: Tensor) -> Tensor:
    """``|G_ij| / sqrt(G_ii G_jj)``, NaN where a norm is zero: :func:`~moe_lightning.geometry.jacobian_alignment`
    from the inner products instead of the matrices."""
    norms = gram_EE.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    ok = denom > 0
    cos = gram_EE.abs() / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, cos.clamp_max(1.0), torch.full_like(cos, math.nan))
