"""Spectra of the whole layer's Jacobian through the router, ``J = Σ_e g_e J_e + Σ_e f_e ∇g_eᵀ`` (docs/geometry.md
§1–2), with uniform token weights: formed by the product rule or torch.func, or as composed matrix-free products,
whose top-``r`` values give σ_max and the mean spectrum's head, and whose Hutchinson and SLQ estimates give the
statistics of the whole spectrum with their standard errors (the sum of the experts' products has no small core)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator, SpectralMoments, safe_div
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.tokens import TokenCounts
from moe_lightning.geometry.estimates import mark_topr_products, whole_spectrum_statistics, whole_spectrum_variants
from moe_lightning.geometry.jacobians import compose_layer_jacobian, jacobians, layer_jacobian
from moe_lightning.geometry.krylov import SMALL_BLOCK, krylov_bytes_per_token
from moe_lightning.geometry.operators import (
    JacobianOperator,
    func_jacobian_operator,
    router_term,
    sparse_layer_operator,
)
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.spectra import batched_svdvals
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["LayerJacobian"]


class LayerJacobian(Accumulator):
    """Spectral statistics and mean spectrum of the layer Jacobian over all tokens, each weighted 1.

    Args:
        tokens: the token counts (the mean spectrum divides by the tokens probed).
        rank: ``M``, singular values kept per token.
        matrix_free: whether the spectra are top-``M`` values of matrix-free products.
        config: the probe's configuration (the decay fit, and on the matrix-free path ``matrix_free_rank`` and the
            estimators' sample sizes and seed).
        products_dtype: the dtype of the matrix-free products (``ProbeContext.products_dtype``).
    """

    def __init__(
        self, tokens: TokenCounts, rank: int, matrix_free: bool, config: ProbeConfig, products_dtype: torch.dtype
    ):
        self.tokens, self.rank, self.matrix_free, self.config = tokens, rank, matrix_free, config
        self.products_dtype = products_dtype
        self.fit_max = config.decay_fit_max
        self.top = config.matrix_free_rank if matrix_free else None
        # Matrix-free: each chunk's tokens, gates and bootstrap counts, queued until ``ctx.estimate_batch`` tokens
        # share the products of the top-r solve and of the estimates.
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._lone: Chunk | None = None

    #: What the top-``r`` values cannot give (docs/geometry.md §1, "Estimated quantities").
    ESTIMATED = ("frobenius", "stable_rank", "effective_rank")

    def allocate(self, layout: BufferLayout) -> None:
        estimated = self.ESTIMATED if self.matrix_free else ()
        systematic = ("effective_rank",) if self.matrix_free else ()
        self.moments = SpectralMoments(layout, "layer_jac", estimated=estimated, systematic=systematic)
        self.spectrum = layout.allocate("layer_jac/sum_spectrum", self.rank)
        self.unconverged = layout.allocate("layer_jac/unconverged", 1) if self.matrix_free else None

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        if not self.matrix_free:
            # Under expert parallelism the ranks of the expert group see the same tokens and each adds its share.
            share = chunk.ctx.token_share(chunk.num_tokens)
            sv = batched_svdvals(self._formed_jacobians(chunk)[share])
            counts = None if chunk.counts is None else chunk.counts[:, share]
            self._add_spectra(chunk.ctx, buffer, sv, counts)
            return
        # A chunk queued alone is kept: if no other chunk joins it, its own operators serve its batch.
        self._lone = None if self._pending else chunk
        self._pending.append((chunk.x, chunk.gates, chunk.counts))
        if sum(p[0].shape[0] for p in self._pending) >= chunk.ctx.estimate_batch:
            self._estimate(chunk.ctx, buffer)

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        if self._pending:
            self._estimate(ctx, buffer)

    def _estimate(self, ctx: ProbeContext, buffer: Tensor) -> None:
        """The queued tokens' top-``r`` values and whole-spectrum estimates (Hutchinson's Frobenius norm and stable
        rank, the SLQ effective rank: docs/geometry.md §1, "Estimated quantities"), all on one operator whose products
        round in ``ctx.products_dtype`` and share each GEMM against an expert's weights among the batch's tokens
        routed to it; then their statistics into the moments."""
        xs, gs, cs = zip(*self._pending, strict=True)
        self._pending.clear()
        x, g = torch.cat(xs), torch.cat(gs)
        counts = None if cs[0] is None else torch.cat(cs, dim=1)
        lone, self._lone = self._lone if len(xs) == 1 and not ctx.casts_products else None, None
        op = self._operator_of(lone) if lone is not None else self._products_operator(ctx, x, g)
        sv, converged = self._top_values(ctx, op, x, g)
        # The probes' salt E is no expert's.
        whole = whole_spectrum_statistics(op, x, sv, self.config, salt=ctx.num_experts)
        # Every one of them is an estimate with a variance: under expert parallelism each rank adds its share.
        share = ctx.token_share(x.shape[0])
        known = {name: tuple(t[share] for t in parts) for name, parts in whole.items()}
        self._add_spectra(ctx, buffer, sv[share], None if counts is None else counts[:, share], known)
        self.unconverged.of(buffer).add_((~converged[share]).sum())

    def _top_values(self, ctx: ProbeContext, op: JacobianOperator, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The top-``r`` singular values at the batch's tokens and whether each converged. Where the memory budget
        does not hold the batch's full bases (``matrix_free_max_iter`` blocks of ``K`` columns for every token), the
        batch runs with Krylov blocks of :data:`~moe_lightning.geometry.krylov.SMALL_BLOCK` columns (which reach a
        given accuracy with the fewest columns) and as many columns as the budget holds; a token that has not
        converged when that cap stops it is solved again with the full ``matrix_free_max_iter``,
        ``ctx.chunk_size`` tokens at a time (a chunk's budget holds a full basis)."""
        cfg, n, full = ctx.config, x.shape[0], ctx.config.matrix_free_max_iter
        k = min(self.top + cfg.matrix_free_oversample, ctx.dim)
        sizes = x.element_size(), torch.empty(0, dtype=op.rounding or op.dtype).element_size()

        def blocks(block: int | None) -> int:  # the most blocks of K columns the budget holds for the batch
            iters = full
            while iters and n * krylov_bytes_per_token(ctx.dim, k, iters, *sizes, block) > cfg.memory_budget_bytes:
                iters -= 1
            return iters

        if blocks(None) == full:
            res = ctx.solve_topr(op, x)
            return res.values, res.converged
        if iters := blocks(SMALL_BLOCK):
            res = ctx.solve_topr(op, x, max_iter=iters, block_size=SMALL_BLOCK)
            values, converged = res.values, res.converged
        else:  # not one block per token fits: every token is solved a chunk at a time
            values = x.new_zeros(n, min(self.top, ctx.dim))
            converged = torch.zeros(n, dtype=torch.bool, device=x.device)
        # Every rank of an expert group holds the same values, so all of them solve the same tokens again.
        missed = (~converged).nonzero().flatten()
        for again in missed.split(ctx.chunk_size) if missed.numel() else ():
            res = ctx.solve_topr(self._products_operator(ctx, x[again], g[again]), x[again])
            values[again], converged[again] = res.values.to(values.dtype), res.converged
        return values, converged

    def _products_operator(self, ctx: ProbeContext, x_ND: Tensor, g_NE: Tensor) -> JacobianOperator:
        """The layer Jacobians at ``x_ND`` (gates ``g_NE``) as products in ``ctx.products_dtype``, taking and giving
        ``ctx.dtype`` (:meth:`ProbeContext.products_operator`)."""
        return ctx.products_operator(lambda c, x: self._operator_of(Chunk(c, x, g_NE.to(c.dtype))), x_ND)

    def _add_spectra(
        self, ctx: ProbeContext, buffer: Tensor, sv: Tensor, counts: Tensor | None, known: dict | None = None
    ) -> None:
        ones = torch.ones(sv.shape[0], dtype=ctx.dtype, device=sv.device)
        self.moments.add(
            buffer,
            sv,
            ones,
            fit_max=self.fit_max,
            truncated=self.matrix_free,
            ctx=ctx,
            counts_BN=counts,
            known=known,
        )
        self.spectrum.of(buffer).add_(sv.sum(0))

    def _formed_jacobians(self, chunk: Chunk) -> Tensor:
        ctx, x, g = chunk.ctx, chunk.x, chunk.gates
        cfg = ctx.config
        if ctx.expert_group is None:
            if cfg.layer_jacobian_method == "func":
                return layer_jacobian(ctx.view, x, method="func", memory_budget_bytes=cfg.memory_budget_bytes)
            if not cfg.jacobian:  # no expert Jacobians on this chunk to reuse
                return layer_jacobian(ctx.view, x, method="compose", memory_budget_bytes=cfg.memory_budget_bytes)

        # The product rule, J = Σ_e g_e J_e + Σ_e f_e ∇g_eᵀ, over the experts here; under expert parallelism each
        # rank's share of the sum is summed over the expert group.
        def partial() -> Tensor:
            dg = jacobians(ctx.view.gates, x, memory_budget_bytes=cfg.memory_budget_bytes, mode="jacrev")
            here, empty = ctx.experts_here, x.new_zeros(0, ctx.dim, ctx.dim)
            outputs = [chunk.all_token_output(e) if e in here else None for e in range(ctx.num_experts)]
            d_out = next(f.shape[-1] for f in outputs if f is not None)
            outputs = [f if f is not None else x.new_zeros(x.shape[0], d_out) for f in outputs]
            parts = [(chunk.rows[e], chunk.jacobian(e) if e in here else empty) for e in range(ctx.num_experts)]
            return compose_layer_jacobian(g, dg.to(g.dtype), outputs, parts)

        return ctx.sum_over_experts(partial, (x.shape[0], ctx.dim, ctx.dim))

    def _operator_of(self, chunk: Chunk) -> JacobianOperator:
        """The layer Jacobians at the chunk's tokens as products in the chunk's dtype: composed from the experts'
        where they offer products, else by torch.func through the layer function."""
        ctx = chunk.ctx
        view, experts = ctx.view, ctx.experts

        def layer_fn(x: Tensor) -> Tensor:
            g = view.gates(x)
            return sum(g[:, e : e + 1] * experts[e](x) for e in range(len(experts)))

        if ctx.expert_group is None:
            op = None if ctx.config.layer_jacobian_method == "func" else self._operator(chunk)
        else:  # this rank's share, its products summed over the group; NaN products if it cannot build it
            op = _summed_over_experts(ctx, ctx.guarded(lambda: self._local_operator(chunk), lambda: None), chunk)
        return op or func_jacobian_operator(layer_fn, chunk.x)

    def _local_operator(self, chunk: Chunk) -> tuple[JacobianOperator, list]:
        """Under expert parallelism: the composed products of the experts here and their parts (a ``ValueError``
        if a view offers no expert operators, which the products across ranks need)."""
        parts = self._parts(chunk)
        if parts is None:
            name = chunk.ctx.view.name
            raise ValueError(
                f"probe under expert parallelism: view {name!r} offers no expert_jacobian_operator, which the "
                "matrix-free layer Jacobian across ranks needs"
            )
        return self._compose(chunk, parts), parts

    def _operator(self, chunk: Chunk) -> JacobianOperator | None:
        """The layer Jacobian as composed products (:func:`compose_layer_operator`) of the experts here when every
        expert with routed tokens offers ``expert_jacobian_operator``; None (torch.func through the layer
        function) otherwise."""
        parts = self._parts(chunk)
        return None if parts is None else self._compose(chunk, parts)

    @staticmethod
    def _parts(chunk: Chunk) -> list[tuple[Tensor, JacobianOperator | None]] | None:
        """The ``(rows, operator)`` pair of every expert (operator None for one without tokens here), or None if an
        expert with routed tokens has no closed-form products. The chunk's expert operators are reused where they
        hold the same tokens."""
        ctx, x, g = chunk.ctx, chunk.x, chunk.gates
        here, parts = ctx.experts_here, []
        for e in range(ctx.num_experts):
            rows = (g[:, e] != 0) if e in here else chunk.rows[e]  # none for another rank's expert
            if not bool(rows.any()):
                parts.append((rows, None))
                continue
            op = chunk.operator(e) if torch.equal(chunk.rows[e], rows) else ctx.expert_operator(e, x[rows])
            if op is None:
                return None
            parts.append((rows, op))
        return parts

    @staticmethod
    def _compose(chunk: Chunk, parts: list) -> JacobianOperator:
        """The product rule's operator from the experts' ``parts``, the gate Jacobians and the outputs here."""
        return sparse_layer_operator(chunk.gates, *_router_factors(chunk), parts)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        values: dict[str, Tensor] = {}
        self.moments.write(buffer, values, report.variants, fit_max=self.fit_max, top=self.top)
        report.layer.update({k: float(val) for k, val in values.items()})
        n_tok = self.tokens.total.of(buffer)
        report.spectra["layer_jac_mean_spectrum"] = safe_div(self.spectrum.of(buffer), n_tok)
        report.variants["layer_jac"] = "through_router_uniform_token_weights"
        if self.matrix_free:  # the whole spectrum's statistics, estimated (each with a ``_se`` key)
            mark_topr_products(report.variants, "layer_jac", self.config, self.products_dtype)
            report.variants.update(whole_spectrum_variants("layer_jac", self.config, products=self.products_dtype))
        if self.unconverged is not None:
            report.layer["layer_jac_unconverged"] = float(self.unconverged.of(buffer))


def _router_factors(chunk: Chunk) -> tuple[Tensor, Tensor]:
    """The router term's factors at the chunk's tokens (:func:`~moe_lightning.geometry.operators.router_term`):
    the gate Jacobians of the experts whose gate moves at each token and their outputs there (this rank's experts'
    outputs; another rank's count as zero, as the group sums the products). The dense ``(n, E, D)`` gate Jacobians
    are formed a quarter of the memory budget at a time."""
    ctx, x = chunk.ctx, chunk.x
    here, budget = ctx.experts_here, ctx.config.memory_budget_bytes
    step = max(1, budget // (4 * ctx.num_experts * ctx.dim * x.element_size()))
    dgs, fs = [], []
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        dg = jacobians(ctx.view.gates, x[rows], memory_budget_bytes=budget, mode="jacrev").to(ctx.dtype)

        def output_at(e: int, at_n: Tensor, start: int = start, dg: Tensor = dg) -> Tensor:
            if e not in here:
                return dg.new_zeros(int(at_n.sum()), ctx.dim)
            at_N = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            at_N[start : start + at_n.shape[0]] = at_n
            return chunk.outputs_at(e, at_N)

        dg_nKD, f_nKO = router_term(dg, output_at)
        dgs.append(dg_nKD)
        fs.append(f_nKO)
    k = max(t.shape[1] for t in dgs)
    dg_NKD = torch.cat([F.pad(t, (0, 0, 0, k - t.shape[1])) for t in dgs])
    f_NKO = torch.cat([F.pad(t, (0, 0, 0, k - t.shape[1])) for t in fs])
    return dg_NKD, f_NKO


def _summed_over_experts(
    ctx: ProbeContext, local: tuple[JacobianOperator, list] | None, chunk: Chunk
) -> JacobianOperator:
    """The layer operator of the experts here (``local``: the operator and its parts), its products summed over the
    expert group: the whole layer's. ``local`` None (this rank could not build it): NaN products, so that the
    other ranks' products still find this rank.

    The ranks of the group run the same solver on the same tokens from the same seed, so they call the products
    in the same order with the same block, and the summed products are the same on every rank. The block width
    follows ``gemm_tokens``, the mean routed tokens of the experts with any, taken over the whole group as one
    process takes it."""
    n, d = chunk.num_tokens, ctx.dim
    if local is None:
        op = JacobianOperator(
            lambda V: ctx.nan(n, d, V.shape[-1]), lambda U: ctx.nan(n, d, U.shape[-1]), n, d, d, ctx.dtype, ctx.device
        )
        routed = []
    else:
        op, parts = local
        routed = [float(o.gemm_tokens or o.num_tokens) for _, o in parts if o is not None]
    stats = torch.tensor([sum(routed), len(routed)], dtype=ctx.dtype, device=ctx.device)
    total, count = ctx.sum_over_experts(lambda: stats, (2,)).tolist()
    return replace(
        op,
        apply=lambda V: ctx.sum_over_experts(lambda: op.apply(V), (n, op.d_out, V.shape[-1])),
        apply_transpose=lambda U: ctx.sum_over_experts(lambda: op.apply_transpose(U), (n, op.d_in, U.shape[-1])),
        gemm_tokens=max(1, int(total) // int(count)) if count == count and count else None,
    )
