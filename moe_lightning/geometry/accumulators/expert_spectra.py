"""Singular-value spectra of each expert's Jacobian (docs/geometry.md §1–2): exact SVDs of formed Jacobians; on the
matrix-free path, every value exactly from the small core of a factored expert of rank ``H < D``, or else the top-``r``
values of an expert's routed tokens, queued across chunks into full batches, with the statistics that need the whole
spectrum exact from a factored expert's factors (Frobenius norm) or estimated with a standard error (Hutchinson's
Frobenius norm of an expert without factors, the effective rank by stochastic Lanczos quadrature)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator, SpectralMoments, safe_div, take_queued
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.tokens import TokenCounts
from moe_lightning.geometry.estimates import mark_topr_products, whole_spectrum_statistics, whole_spectrum_variants
from moe_lightning.geometry.factored import core_factors, factored_frobenius_sq, factored_singular_values
from moe_lightning.geometry.operators import JacobianOperator, func_jacobian_operator
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.spectra import SPECTRAL_STAT_NAMES, batched_svdvals
from moe_lightning.geometry.statistics import BufferLayout

__all__ = ["ExpertSpectra"]


class ExpertSpectra(Accumulator):
    """Weighted spectral statistics, mean spectrum and (matrix-free) unconverged tokens per expert.

    Args:
        ctx: the probe's context.
        tokens: the token counts (the mean spectrum divides by ``Σw``).
        share_operators: build an expert's operator when its tokens arrive, so that the layer Jacobian's
            composed operator (built on the same tokens of the chunk) reuses it.
    """

    def __init__(self, ctx: ProbeContext, tokens: TokenCounts, share_operators: bool) -> None:
        cfg = self.config = ctx.config
        self.tokens, self.num_experts = tokens, ctx.num_experts
        # A factored expert of rank H < D has its whole spectrum, zero-padded to D, exactly: the exact path's
        # statistics, keys and spectrum length, only the variant names the path.
        self.core, self.factored = ctx.factored_core, ctx.factored
        self.rank = ctx.dim if self.core else ctx.rank
        self.matrix_free = ctx.matrix_free and not self.core
        self.share_operators = share_operators
        self.products_dtype = ctx.products_dtype
        self.fit_max, self.top = cfg.decay_fit_max, cfg.matrix_free_rank if self.matrix_free else None
        # What the top-r values cannot give (docs/geometry.md §1, "Estimated quantities"): the effective rank by
        # stochastic Lanczos quadrature, and without factors the Frobenius norm (so the stable rank) by Hutchinson.
        self.estimated: tuple[str, ...] = ()
        self.systematic = ("effective_rank",) if self.matrix_free else ()
        if self.matrix_free:
            self.estimated = ("effective_rank",) if self.factored else ("frobenius", "stable_rank", "effective_rank")
        if self.core:
            self.source = "exact_factored_core"
        elif ctx.matrix_free:
            self.source = f"matrix_free_topr(r={ctx.rank})"
        elif cfg.jacobian_method == "func":
            self.source = "torch_func"
        else:
            self.source = "closed_form" if ctx.has_closed_form() else "torch_func"
        # Matrix-free spectra run on an expert's routed tokens gathered over chunks, ``chunk_size`` at a time: an
        # expert sees only its share of a chunk (about top_k / E of it), and its tokens share every GEMM of the
        # Krylov products, so full batches are what make them fast. ``_lone_op[e]``: the operator built on
        # exactly the tokens queued for ``e`` (one entry), reused by its run.
        # Each entry: tokens, weights and (``(B, n)``, or None) bootstrap counts.
        self._pending: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]] = {e: [] for e in range(self.num_experts)}
        self._lone_op: dict[int, JacobianOperator] = {}

    def allocate(self, layout: BufferLayout) -> None:
        self.moments = SpectralMoments(
            layout, "jac", self.num_experts, estimated=self.estimated, systematic=self.systematic
        )
        self.spectrum = layout.allocate("jac/sum_w_spectrum", self.num_experts, self.rank)
        self.unconverged = layout.allocate("jac/unconverged", self.num_experts) if self.matrix_free else None

    def _add_spectra(
        self,
        ctx: ProbeContext,
        buffer: Tensor,
        e: int,
        sv_NM: Tensor,
        w_N: Tensor,
        c_BN: Tensor | None,
        known: dict[str, tuple[Tensor, ...]] | None = None,
    ) -> None:
        self.moments.add(
            buffer,
            sv_NM,
            w_N,
            fit_max=self.fit_max,
            truncated=self.matrix_free,
            index=e,
            ctx=ctx,
            counts_BN=c_BN,
            known=known,
        )
        self.spectrum.of(buffer)[e] += (w_N.unsqueeze(-1) * sv_NM).sum(0)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        if self.core or self.matrix_free:
            self._queue(chunk, buffer)
            return
        for e in chunk.ctx.experts_here:
            J_e = chunk.jacobian(e)
            sv = batched_svdvals(J_e) if J_e.shape[0] else J_e.new_zeros(0, self.rank)
            self._add_spectra(chunk.ctx, buffer, e, sv, chunk.weights(e), chunk.counts_of(e))

    def _queue(self, chunk: Chunk, buffer: Tensor) -> None:
        for e in chunk.ctx.experts_here:
            x_e = chunk.inputs(e)
            if not x_e.shape[0]:
                continue
            op = chunk.operator(e) if self.share_operators and not self.core else None
            pending = self._pending[e]
            if pending or op is None:
                self._lone_op.pop(e, None)  # several entries run as one batch: no operator to reuse
            else:
                self._lone_op[e] = op
            pending.append((x_e, chunk.weights(e), chunk.counts_of(e)))
            queued = sum(q[0].shape[0] for q in pending)
            if self.core:
                # The core's QRs of the weights cost O(D·F²), the cores of a token far less: the tokens wait for
                # the probe's end, their copies bounded by one E-th of the memory budget per expert.
                queued_bytes = queued * chunk.ctx.dim * x_e.element_size()
                if queued_bytes * self.num_experts >= chunk.ctx.config.memory_budget_bytes:
                    self._flush_core(chunk.ctx, buffer, e)
            elif queued >= chunk.ctx.chunk_size:
                self._flush(chunk.ctx, buffer, e, final=False)

    def _flush_core(self, ctx: ProbeContext, buffer: Tensor, e: int) -> None:
        """Every singular value of expert ``e``'s queued tokens from the cores of its factors, what the weights give
        (:func:`~moe_lightning.geometry.factored.core_factors`) once for all of them and the cores in batches within
        the memory budget (docs/geometry.md §1)."""
        x_q, w_q, c_q = take_queued(self._pending[e])
        factors = ctx.expert_factors(e, x_q)
        core = core_factors(factors)
        # The cores run in batches of their own size, not the chunk's (which also bounds what a chunk's other parts
        # hold: one token at real sizes), so that the batched GEMMs and eigensolves split over the threads. A token
        # holds its (H, K_B) scaled factor and four H × H matrices: the scaled Gram and its temporaries, the core.
        h = factors.left_OH.shape[1]
        per_token = x_q.element_size() * h * (factors.width + 4 * h)
        batch = max(1, ctx.config.memory_budget_bytes // per_token)
        for start in range(0, x_q.shape[0], batch):
            rows = slice(start, start + batch)
            sv = factored_singular_values(factors, self.rank, core=core, rows=rows).to(ctx.dtype)
            self._add_spectra(ctx, buffer, e, sv, w_q[rows], None if c_q is None else c_q[:, rows])

    def _flush(self, ctx: ProbeContext, buffer: Tensor, e: int, final: bool) -> None:
        """Run expert ``e``'s queued tokens in calls of ``chunk_size``; a shorter remainder waits unless ``final``."""
        built = self._lone_op.pop(e, None)  # one entry of at most ``chunk_size`` tokens: it runs as one batch
        x_q, w_q, c_q = take_queued(self._pending[e])
        chunk = ctx.chunk_size
        n_run = x_q.shape[0] if final else x_q.shape[0] // chunk * chunk
        if n_run < x_q.shape[0]:
            self._pending[e].append((x_q[n_run:], w_q[n_run:], None if c_q is None else c_q[:, n_run:]))
        for start in range(0, n_run, chunk):
            x_b, w_b = x_q[start : start + chunk], w_q[start : start + chunk]
            c_b = None if c_q is None else c_q[:, start : start + chunk]
            exact = None
            if self.factored:  # the exact Frobenius norm, from the factors in the probe's dtype
                factors = None if built is None else built.factors
                exact = factored_frobenius_sq(ctx.expert_factors(e, x_b) if factors is None else factors)
            op = self._products_operator(ctx, e, x_b, built)
            res = ctx.solve_topr(op, x_b)
            # the statistics of the whole spectrum that the top-r values cannot give (docs/geometry.md §1,
            # "Estimated quantities"), with the variances of those estimated, from the same products
            whole = whole_spectrum_statistics(op, x_b, res.values, self.config, salt=e, frobenius_sq=exact)
            self._add_spectra(ctx, buffer, e, res.values, w_b, c_b, whole)
            self.unconverged.of(buffer)[e] += (~res.converged).sum()

    @staticmethod
    def _products_operator(ctx: ProbeContext, e: int, x_ND: Tensor, built: JacobianOperator | None) -> JacobianOperator:
        """Expert ``e``'s Jacobians at ``x_ND`` as products in ``ctx.products_dtype`` (closed-form where the view
        offers them, else by torch.func): ``built`` where it is already that, on these tokens."""
        if built is not None and not ctx.casts_products:
            return built
        return ctx.products_operator(
            lambda c, x: c.expert_operator(e, x) or func_jacobian_operator(c.experts[e], x), x_ND
        )

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        for e in range(self.num_experts):
            ctx.release()  # each expert's queue runs with its own cast weights and cores
            if self._pending[e] and self.core:
                self._flush_core(ctx, buffer, e)
            elif self._pending[e]:  # what is left: fewer than ``chunk_size`` tokens an expert
                self._flush(ctx, buffer, e, final=True)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        self.moments.write(buffer, report.expert, report.variants, fit_max=self.fit_max, top=self.top)
        v = report.variants
        if self.core:
            for name in SPECTRAL_STAT_NAMES:
                v[f"jac_{name}"] += "_exact_factored_core"
        elif self.matrix_free:
            # the whole spectrum's statistics, exact from the factors or estimated (with a ``_se`` key)
            mark_topr_products(v, "jac", self.config, self.products_dtype)
            v.update(
                whole_spectrum_variants("jac", self.config, exact_frobenius=self.factored, products=self.products_dtype)
            )
        sum_w = self.tokens.sum_w.of(buffer)
        report.spectra["jac_mean_spectrum"] = safe_div(self.spectrum.of(buffer), sum_w.unsqueeze(-1))
        report.variants["jac_source"] = self.source
        if self.unconverged is not None:
            report.expert["jac_unconverged"] = self.unconverged.of(buffer).clone()
