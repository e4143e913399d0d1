"""The gate-weighted mean Jacobian ``Σ w J_e`` of each expert (docs/geometry.md §4–5), shared by the alignment and
the functional subspaces: formed (exact path), or as ``Σ w s_e`` for factored experts at any width."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator, take_queued
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.tokens import TokenCounts
from moe_lightning.geometry.factored import mean_jacobian_gram, mean_jacobian_singular
from moe_lightning.geometry.operators import JacobianFactors
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.statistics import BufferLayout
from moe_lightning.geometry.view import stored_weights_dtype

__all__ = ["FactoredMeanJacobian", "FactoredMeanJacobians", "MeanJacobian", "UnreadableWeights", "warn_unreadable"]


class UnreadableWeights(RuntimeError):
    """A factored expert's weights could not be read when the statistics were finalised (sharded, or held by
    another rank)."""


def warn_unreadable(layer: str, what: str, error: UnreadableWeights) -> None:
    """Warn that ``what`` of ``layer`` is not reported, and why (a quantity that cannot be trusted is not logged)."""
    warnings.warn(
        f"probe of {layer!r}: {what} is not reported: it needs the experts' weights when the statistics are "
        f"finalised, and {error}",
        RuntimeWarning,
        stacklevel=3,
    )


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


class FactoredMeanJacobians:
    """The finalised mean Jacobians of factored experts, ``J̄_e = A_e · Σ_g diag(m_{e,g}) B_{e,g}``: what the
    alignment and the functional subspaces read, each computed once, when first asked for.

    Args:
        means: ``E`` mean scales ``m_e``, None for an expert without tokens (or whose ``Σ w s`` is zero).
        read_factors: expert ``e``'s factors, read from the view's weights.
        dim: D.
        memory_budget_bytes: bound on one block of :func:`~moe_lightning.geometry.factored.mean_jacobian_gram`.
    """

    def __init__(
        self,
        means: list[Tensor | None],
        read_factors: Callable[[int], JacobianFactors],
        dim: int,
        memory_budget_bytes: int,
    ) -> None:
        self.means, self.read_factors, self.dim, self.budget = means, read_factors, dim, memory_budget_bytes
        self._gram: Tensor | None = None

    def gram(self) -> Tensor:
        """``(E, E)`` Frobenius inner products ``⟨J̄_i, J̄_j⟩_F`` (0 in the rows of experts without a mean)."""
        if self._gram is None:
            self._gram = mean_jacobian_gram(lambda e: self.read_factors(e, stored=True), self.means, self.budget)
        return self._gram

    def singular(self, e: int, top: int | None = None) -> tuple[Tensor, Tensor] | None:
        """``(D,)`` singular values and the ``top`` leading right singular vectors (rows; None: all) of ``J̄_e``;
        None without a mean."""
        mean = self.means[e]
        return None if mean is None else mean_jacobian_singular(self.read_factors(e), mean, self.dim, top)


class FactoredMeanJacobian(Accumulator):
    """``Σ_n w_n s_e(x_n)`` over each expert's routed tokens, ``(E, F)``: the gate-weighted mean Jacobian of factored
    experts (docs/geometry.md §1, "Factored experts at any width"), exact and additive at any D.

    Finalising it needs the experts' weights, which the statistics do not hold (``E · 3 · D · H`` numbers): they
    are read again from the view, expert by expert, so :func:`~moe_lightning.geometry.finalize` must run while the
    view's weights are whole on this rank (as in :func:`~moe_lightning.geometry.probe` and the monitors under DDP).
    Where they cannot be read, the quantities that need them are not reported and a warning says why.

    Args:
        ctx: the probe's context (``factored``).
        tokens: the token counts (the means divide by ``Σw``).
    """

    def __init__(self, ctx: ProbeContext, tokens: TokenCounts) -> None:
        self.tokens = tokens
        self.num_experts, self.dim, self.width = ctx.num_experts, ctx.dim, ctx.factor_width
        self.budget = ctx.config.memory_budget_bytes
        view, dtype, device = ctx.view, ctx.dtype, ctx.device

        def read_factors(e: int, stored: bool = False) -> JacobianFactors:
            # stored: in the dtype the weights are stored in, with no cast copy where the view offers them as they
            # are (the mean Jacobians' Gram casts the rows it needs, and each product promotes the rest exactly).
            read = (stored_weights_dtype(view, e) or dtype) if stored else dtype
            try:
                op = view.expert_jacobian_operator(e, torch.zeros(1, ctx.dim, dtype=read, device=device))
            except Exception as error:  # noqa: BLE001 - whatever stops the view from reading them is the reason
                raise UnreadableWeights(f"reading expert {e}'s weights failed: {error}") from error
            f = None if op is None else op.factors
            tensors = () if f is None else (f.left_OH, *f.rights_HI)
            if f is None or any(type(t) is not Tensor for t in tensors):  # a sharded (DTensor) weight, say
                raise UnreadableWeights(f"expert {e}'s weights are not whole on this rank")
            # detached: finalising runs outside the probe's no_grad, on the module's own parameters
            rights = tuple(r.detach().to(read) for r in f.rights_HI)
            return JacobianFactors(f.left_OH.detach().to(read), rights, f.scales_NGH.detach())

        self.read_factors = read_factors
        self._pending: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]] = {}  # tokens, weights, counts

    def allocate(self, layout: BufferLayout) -> None:
        self.sum_ws = layout.allocate("mean_jacobian/sum_w_scales", self.num_experts, self.width, resampled=True)

    def add(self, chunk: Chunk, buffer: Tensor) -> None:
        # The scales need each routed expert's operator, which may cast its weights: a token reaches few of many
        # experts, so the tokens wait per expert, as the core spectra's do, and each expert is read once for all of
        # them (its queue bounded by one E-th of the memory budget).
        ctx = chunk.ctx
        for e in ctx.experts_here:
            if not chunk.rows[e].any():
                continue
            queue = self._pending.setdefault(e, [])
            queue.append((chunk.inputs(e), chunk.weights(e), chunk.counts_of(e)))
            queued = sum(q[0].shape[0] for q in queue)
            if queued * ctx.dim * chunk.x.element_size() * self.num_experts >= self.budget:
                self._flush(ctx, buffer, e)

    def close(self, ctx: ProbeContext, buffer: Tensor) -> None:
        for e in sorted(self._pending):
            ctx.release()  # each expert's read casts its own weights
            self._flush(ctx, buffer, e)

    def _flush(self, ctx: ProbeContext, buffer: Tensor, e: int) -> None:
        x, w, c = take_queued(self._pending.pop(e))
        s = ctx.expert_factors(e, x).scales_NGH
        sum_ws = self.sum_ws.of(buffer)
        s_NF = s.reshape(s.shape[0], -1).to(sum_ws.dtype)
        s_NF = torch.nn.functional.pad(s_NF, (0, self.width - s_NF.shape[1]))  # experts of other widths
        sum_ws[e] += w @ s_NF
        if c is not None:
            ctx.add_resampled(buffer, self.sum_ws, c, w.unsqueeze(-1) * s_NF, index=e)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> FactoredMeanJacobians:
        sum_ws, sum_w = self.sum_ws.of(buffer), self.tokens.sum_w.of(buffer)
        means: list[Tensor | None] = []
        for e in range(self.num_experts):
            ok = bool(sum_w[e] > 0) and bool((sum_ws[e] != 0).any())
            means.append(sum_ws[e] / sum_w[e] if ok else None)
        return FactoredMeanJacobians(means, self.read_factors, self.dim, self.budget)
