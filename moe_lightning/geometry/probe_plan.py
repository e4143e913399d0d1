"""The plan of one probe before its accumulators are built (:class:`~moe_lightning.geometry.accumulators.ProbeContext`):
the path each quantity takes (exact, or matrix-free above ``ProbeConfig.matrix_free_threshold``, with factored
experts' exact quantities at any width: docs/geometry.md §1), the chunk of tokens the memory budget allows and the
experts this rank holds.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``F`` an expert's flattened Jacobian scales.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_lightning.common.memory import release_freed_memory
from moe_lightning.geometry.accumulators import ProbeContext
from moe_lightning.geometry.factored import factored_core_rank
from moe_lightning.geometry.krylov import TopRResult, krylov_bytes_per_token, topr_singular_values
from moe_lightning.geometry.operators import JacobianOperator
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.view import CastsOnRead, HasJacobianOperator, MoEView, TokenFn, stored_weights_dtype

__all__ = ["probe_context"]


def _bytes_per_token(cfg: ProbeConfig, d: int, m: int, num_experts: int, itemsize: int, matrix_free: bool) -> int:
    """Peak bytes per token of one chunk of :func:`~moe_lightning.geometry.probe.probe_statistics`;
    ``chunk = memory_budget_bytes // this``."""
    if matrix_free:
        # No D x D matrix: the Krylov workspace, plus the experts' outputs and gate Jacobians for the layer
        # operator and K block columns through ~4D-wide expert activations. Tokens of a call share every GEMM
        # against the weights, and from 8 tokens on the Krylov blocks shrink to 4 columns, so per token a larger
        # call is cheaper (docs/benchmarks/geometry.md): chunks are as large as the budget allows.
        # The estimates of the whole spectrum (geometry/estimates.py) run after the Krylov solve, on the same
        # tokens: the Lanczos bases of the quadrature starts with their temporaries, and the Hutchinson probes
        # with their products.
        k = min(m + cfg.matrix_free_oversample, d)
        starts, steps = cfg.matrix_free_slq_starts, min(cfg.matrix_free_slq_steps, d)
        estimates = starts * (steps + 6) + 3 * cfg.matrix_free_trace_probes
        return krylov_bytes_per_token(d, k, cfg.matrix_free_max_iter, itemsize) + itemsize * d * (
            3 * num_experts + 8 * k + estimates
        )
    return itemsize * (3 * (num_experts + 1) * d * d + 8 * d)


def _factor_shapes(view: MoEView, cfg: ProbeConfig, x_ND: Tensor, experts: range) -> list[tuple[int, int, int]] | None:
    """``(F, core rank, weights)`` of each expert's Jacobian factors (``weights``: the numbers of its left and right
    factors), read from its operator at one zero token (shapes only, so every rank decides alike), or None when one
    of them offers none (docs/geometry.md §1, "Factored experts at any width")."""
    if cfg.jacobian_method == "func" or not isinstance(view, HasJacobianOperator):
        return None
    x0 = x_ND.new_zeros(1, x_ND.shape[1])
    shapes = []
    for e in experts:
        op = view.expert_jacobian_operator(e, x0)
        if op is None or op.factors is None:
            return None
        f = op.factors
        shapes.append((f.width, factored_core_rank(f), f.left_OH.numel() + sum(r.numel() for r in f.rights_HI)))
    return shapes


def _routed_per_token(view: MoEView, x_ND: Tensor, dtype: torch.dtype) -> int:
    """The most experts one token is routed to, among the first tokens of ``x_ND`` (those with finite values)."""
    x = x_ND[:64]
    x = x[torch.isfinite(x).all(-1)]
    if not x.shape[0]:
        return int(view.num_experts)
    g_NE = view.gates(x).to(dtype)
    return max(1, int((g_NE.nan_to_num() != 0).sum(-1).max()))


def _topr_solver(cfg: ProbeConfig, m: int) -> Callable[[TokenFn | JacobianOperator, Tensor], TopRResult]:
    """:func:`topr_singular_values` with ``cfg``'s settings, the same for the experts' spectra and the layer's
    (``max_iter`` overrides ``cfg.matrix_free_max_iter`` and ``block_size`` the Krylov block: a batch whose full
    basis would not fit the budget)."""

    def solve(
        fn: TokenFn | JacobianOperator, x_ND: Tensor, max_iter: int | None = None, block_size: int | None = None
    ) -> TopRResult:
        return topr_singular_values(
            fn,
            x_ND,
            m,
            oversample=cfg.matrix_free_oversample,
            max_iter=cfg.matrix_free_max_iter if max_iter is None else max_iter,
            tol=cfg.matrix_free_tol,
            seed=cfg.seed,
            block_size=block_size,
        )

    return solve


def probe_context(
    view: MoEView, x_ND: Tensor, cfg: ProbeConfig, expert_group: Any, local_experts: range | None
) -> ProbeContext:
    """The probe's context before its accumulators are built: the view's functions, the path (exact or
    matrix-free), the chunk size and the experts this rank holds."""
    num_experts, d = int(view.num_experts), x_ND.shape[1]
    matrix_free = d > cfg.matrix_free_threshold
    m = min(cfg.matrix_free_rank, d) if matrix_free else d
    per_token = _bytes_per_token(cfg, d, m, num_experts, x_ND.element_size(), matrix_free)
    here = range(num_experts) if local_experts is None else local_experts
    shapes = _factor_shapes(view, cfg, x_ND, here) if matrix_free and cfg.jacobian else None
    core = shapes is not None and all(rank < d for _, rank, _ in shapes)
    if core:  # one token's core, (rank × F) scaled factor and (rank × rank) core with its SVD workspace
        per_token = max(per_token, x_ND.element_size() * max(k * (f + 3 * k) for f, k, _ in shapes))
    routed = _routed_per_token(view, x_ND, cfg.dtype) if matrix_free else 0
    if shapes is not None and isinstance(view, CastsOnRead) and view.casts_weights_on_read():
        # Such a view's operator holds a cast copy of its expert's weights, and a chunk's operators (the layer
        # Jacobian composes them) live together: one per expert a token of the chunk is routed to.
        per_token = max(per_token, x_ND.element_size() * routed * max(w for _, _, w in shapes))
    # On the exact path the pointwise alignment needs every expert's Jacobian at every token, E times the Jacobians
    # the spectra form; factored experts give its inner products from their scales instead (docs/geometry.md §4).
    pointwise_shapes = (
        _factor_shapes(view, cfg, x_ND, here)
        if not matrix_free
        and cfg.jacobian
        and cfg.alignment
        and cfg.pointwise_alignment
        and num_experts > 1
        and expert_group is None
        else None
    )
    widths = [f for f, _, _ in shapes or pointwise_shapes or []]
    products_dtype, estimate_batch = cfg.dtype, 1
    if matrix_free:
        products_dtype, estimate_batch = _estimate_plan(view, cfg, x_ND, here, shapes, routed)
    return ProbeContext(
        view=view,
        config=cfg,
        experts=tuple(view.expert(e) for e in range(num_experts)),
        hidden=tuple(view.expert_hidden(e) for e in range(num_experts)),
        dim=d,
        dtype=cfg.dtype,
        device=x_ND.device,
        matrix_free=matrix_free,
        rank=m,
        chunk_size=max(1, cfg.memory_budget_bytes // per_token),
        solve_topr=_topr_solver(cfg, m),
        expert_group=expert_group,
        local_experts=local_experts,
        factored=shapes is not None,
        factored_core=core,
        factor_width=max(widths, default=0),
        pointwise_factors=pointwise_shapes is not None,
        products_dtype=products_dtype,
        estimate_batch=estimate_batch,
        release=release_freed_memory if matrix_free else lambda: None,
    )


def _estimate_plan(
    view: MoEView,
    cfg: ProbeConfig,
    x_ND: Tensor,
    experts: range,
    shapes: list[tuple[int, int, int]] | None,
    routed: int,
) -> tuple[torch.dtype, int]:
    """The dtype of the matrix-free products (the top-``r`` values' and the estimates') and how many tokens the layer
    Jacobian's estimates run on at once (docs/geometry.md §1, "The products' precision").

    The products round in ``cfg.matrix_free_products_dtype`` where the view casts what it reads (another view's
    module is lent copies in ``cfg.dtype``, which its functions then need). Per token a batch holds the
    quadrature's Lanczos bases with their temporaries (``starts · (steps + 6)`` vectors in ``cfg.dtype``), the
    probes, the blocks of Hutchinson's product in both dtypes and the router term's factors; and, where the
    experts' weights are not in the products' dtype already, the cast weights of each expert a token is routed to
    (the operators of a batch live together)."""
    casts = isinstance(view, CastsOnRead) and view.casts_weights_on_read()
    dtype = (cfg.matrix_free_products_dtype or cfg.dtype) if casts else cfg.dtype
    d, size = x_ND.shape[1], x_ND.element_size()
    est_size = torch.empty(0, dtype=dtype).element_size()
    starts, steps, probes = cfg.matrix_free_slq_starts, min(cfg.matrix_free_slq_steps, d), cfg.matrix_free_trace_probes
    per_token = (
        size * d * (starts * (steps + 6) + starts + probes)
        + (size + est_size) * d * 2 * probes
        + est_size * d * 2 * routed
    )
    if shapes is not None and not _weights_in(view, dtype, experts):
        per_token += est_size * routed * max(w for _, _, w in shapes)
    return dtype, max(1, cfg.memory_budget_bytes // per_token)


def _weights_in(view: MoEView, dtype: torch.dtype, experts: range) -> bool:
    """Whether the view offers the weights of ``experts`` (:class:`HasExpertWeights`) and every one is in
    ``dtype``, so that reading them in ``dtype`` copies nothing."""
    return all(stored_weights_dtype(view, e) == dtype for e in experts)
