"""Matrix-free top-r singular values of per-token Jacobians (docs/geometry.md §1, "When d is too large to form J").

Shape legend: ``N`` tokens, ``D`` model dim (``D_in``/``D_out``), ``R`` requested singular values, ``K = R + p``
the block size with oversampling ``p``.

Randomized block Krylov iteration (Musco & Musco 2015; or block subspace iteration, Halko, Martinsson & Tropp
2011, Alg. 4.4) built only on Jacobian-vector
products (``torch.func.jvp``, giving ``J V``) and vector-Jacobian products (``torch.func.vjp``, giving ``Jᵀ U``).
All tokens run at once: for a row-wise function one batched JVP/VJP with a ``(N, D)`` tangent gives every token's
own product, and ``vmap`` over the ``K`` block columns turns matrix-vector products into matrix-matrix products.
The JVP is taken from ``torch.func.linearize`` (the primal is traced once, not recomputed per block). Where the
expert's weights are known, :func:`mlp_jacobian_operator` and :func:`swiglu_jacobian_operator` apply ``J`` and
``Jᵀ`` as plain GEMMs over all tokens and block columns at once (the factored closed forms of §1), which is the
fastest way to multiply by ``J`` without forming it; any :class:`JacobianOperator` can be passed instead of ``fn``.
The Ritz values of the Rayleigh–Ritz step are the estimates; the residual ``‖J v_i − σ_i u_i‖`` of each Ritz
triplet bounds the distance to a true singular value (the Ritz pair is exact for ``Jᵀ``, and for the symmetric
augmented matrix ``[[0, J], [Jᵀ, 0]]`` an eigenpair residual bounds the eigenvalue error; Parlett,
*The Symmetric Eigenvalue Problem*, Thm. 4.5.1), so it is returned as the error estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, linearize, vjp, vmap

from moe_lightning.geometry.jacobians import _silu_derivative, activation_derivative
from moe_lightning.geometry.spectra import batched_svdvals

__all__ = [
    "JacobianOperator",
    "TopRResult",
    "compose_layer_operator",
    "func_jacobian_operator",
    "mlp_jacobian_operator",
    "swiglu_jacobian_operator",
    "topr_singular_values",
]


@dataclass(frozen=True)
class JacobianOperator:
    """Per-token Jacobians ``J_n`` (``D_out × D_in``) of ``N`` tokens, known only through block products.

    Attributes:
        apply: ``(N, D_in, K) -> (N, D_out, K)``, ``V_n ↦ J_n V_n`` for every token ``n``.
        apply_transpose: ``(N, D_out, K) -> (N, D_in, K)``, ``U_n ↦ J_nᵀ U_n``.
        num_tokens: ``N``.
        d_in: ``D_in``.
        d_out: ``D_out``.
        dtype: dtype of the products (and of the random start block).
        device: their device.
        gemm_tokens: how many tokens share one GEMM against a weight inside ``apply`` (None: ``num_tokens``); a
            composed layer operator runs each expert on its routed tokens only, about ``top_k / E`` of them. The
            default Krylov block is chosen so that this many tokens fill a wide GEMM.
    """

    apply: Callable[[Tensor], Tensor]
    apply_transpose: Callable[[Tensor], Tensor]
    num_tokens: int
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device
    gemm_tokens: int | None = None


def _linearized_jvp(fn: Callable[[Tensor], Tensor], x_ND: Tensor) -> Callable[[Tensor], Tensor]:
    """``v ↦ J v`` for all tokens: ``torch.func.linearize`` when it can trace ``fn``, else ``jvp`` per call."""
    try:
        with warnings.catch_warnings():
            # torch-internal noise of the tracer: const-folding warns about weights that are plain tensors, not
            # module attributes, and make_fx touches the deprecated torch.jit.script
            warnings.simplefilter("ignore")
            _, jvp_fn = linearize(fn, x_ND)
        return jvp_fn
    except Exception:  # noqa: BLE001 - a function linearize cannot trace (data-dependent control flow, ...)
        return lambda v: jvp(fn, (x_ND,), (v,))[1]


def func_jacobian_operator(fn: Callable[[Tensor], Tensor], x_ND: Tensor) -> JacobianOperator:
    """The Jacobians of a row-wise function at every token as a :class:`JacobianOperator`, by ``torch.func``.

    ``J V`` is ``vmap`` over block columns of the linearised JVP, ``Jᵀ U`` of the VJP; both are batched over
    tokens because ``fn`` is row-wise (output row ``n`` depends on input row ``n`` only).

    Args:
        fn: row-wise function ``(n, D_in) -> (n, D_out)``.
        x_ND: ``(N, D_in)`` tokens.
    """
    n, d_in = x_ND.shape
    y, vjp_fn = vjp(fn, x_ND)
    jvp_fn = _linearized_jvp(fn, x_ND)

    def apply(V_NIK: Tensor) -> Tensor:
        return vmap(jvp_fn)(V_NIK.permute(2, 0, 1)).permute(1, 2, 0)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        return vmap(lambda u: vjp_fn(u)[0])(U_NOK.permute(2, 0, 1)).permute(1, 2, 0)

    return JacobianOperator(apply, apply_transpose, n, d_in, y.shape[-1], x_ND.dtype, x_ND.device)


def _rows(block_NDK: Tensor) -> Tensor:
    """``(N, D, K) -> (N·K, D)``: every block column of every token as one row, for one GEMM against a weight."""
    n, d, k = block_NDK.shape
    return block_NDK.transpose(1, 2).reshape(n * k, d)


def _block(rows_MD: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_rows`: ``(N·K, D) -> (N, D, K)``."""
    return rows_MD.view(n, -1, rows_MD.shape[-1]).transpose(1, 2)


def _cols(block_NDK: Tensor) -> Tensor:
    """``(N, D, K) -> (D, N·K)``: every block column of every token as one column, for ``weight @ columns``."""
    n, d, k = block_NDK.shape
    return block_NDK.permute(1, 0, 2).reshape(d, n * k)


def _uncols(cols_DM: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_cols`: ``(D, N·K) -> (N, D, K)``."""
    return cols_DM.view(cols_DM.shape[0], n, -1).permute(1, 0, 2)


# MKL runs float32 GEMMs against a large weight faster as ``weight @ (D, N·K) columns`` than as
# ``(N·K, D) rows @ weight`` once there are 16 or more block columns, and slower below that. In float64 the rows
# layout is the faster one, so float64 keeps it; CUDA keeps it too, as nothing shows the columns layout helps there.
# A transposed copy of the weight would cost more than it saves. See docs/benchmarks/geometry.md.
_COLUMN_LAYOUT_MIN = 16


def _columns_layout(width: int, weight: Tensor) -> bool:
    """Multiply ``weight @ columns`` (True) or ``rows @ weight`` (False) for ``width`` block columns in all."""
    return width >= _COLUMN_LAYOUT_MIN and weight.dtype == torch.float32 and weight.device.type == "cpu"


def mlp_jacobian_operator(
    x_ND: Tensor,
    w_in_DH: Tensor,
    b_in_H: Tensor | None,
    w_out_HD: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
) -> JacobianOperator:
    """Products with the MLP expert Jacobians ``J_n = w_outᵀ diag(φ'(z_n)) w_inᵀ`` (docs/geometry.md §1), unformed.

    ``J V`` is ``((Vᵀ w_in) ⊙ φ'(z)) w_out`` and ``Jᵀ U`` is ``((Uᵀ w_outᵀ) ⊙ φ'(z)) w_inᵀ``, each two GEMMs over all
    ``N·K`` block columns at once (``4·D·H`` flops per column). Weight layout as
    :func:`~moe_lightning.geometry.mlp_expert_jacobian`.
    """
    d_in, h = w_in_DH.shape
    if w_out_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"mlp_jacobian_operator: shapes x {tuple(x_ND.shape)}, w_in {tuple(w_in_DH.shape)}, "
            f"w_out {tuple(w_out_HD.shape)} do not chain as (N, D) @ (D, H) @ (H, D_out)"
        )
    n = x_ND.shape[0]
    z_NH = x_ND @ w_in_DH
    if b_in_H is not None:
        z_NH = z_NH + b_in_H
    dphi_N1H = activation_derivative(activation, z_NH).unsqueeze(1)

    dphi_HN1 = dphi_N1H.squeeze(1).t().unsqueeze(-1)

    def apply(V_NIK: Tensor) -> Tensor:
        if _columns_layout(n * V_NIK.shape[-1], w_in_DH):
            t_HNK = (w_in_DH.t() @ _cols(V_NIK)).view(h, n, -1) * dphi_HN1
            return _uncols(w_out_HD.t() @ t_HNK.view(h, -1), n)
        t_NKH = (_rows(V_NIK) @ w_in_DH).view(n, -1, h) * dphi_N1H
        return _block(t_NKH.view(-1, h) @ w_out_HD, n)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        if _columns_layout(n * U_NOK.shape[-1], w_out_HD):
            t_HNK = (w_out_HD @ _cols(U_NOK)).view(h, n, -1) * dphi_HN1
            return _uncols(w_in_DH @ t_HNK.view(h, -1), n)
        t_NKH = (_rows(U_NOK) @ w_out_HD.t()).view(n, -1, h) * dphi_N1H
        return _block(t_NKH.view(-1, h) @ w_in_DH.t(), n)

    return JacobianOperator(apply, apply_transpose, n, d_in, w_out_HD.shape[1], x_ND.dtype, x_ND.device)


def swiglu_jacobian_operator(x_ND: Tensor, w_gate_DH: Tensor, w_up_DH: Tensor, w_down_HD: Tensor) -> JacobianOperator:
    """Products with the SwiGLU expert Jacobians ``J_n = w_downᵀ M(x_n)`` (docs/geometry.md §1), unformed.

    ``M(x) = diag(silu'(a) ⊙ b) w_gateᵀ + diag(silu(a)) w_upᵀ``: ``J V = (c_g ⊙ Vᵀw_gate + c_u ⊙ Vᵀw_up) w_down``
    and ``Jᵀ U = (c_g ⊙ T) w_gateᵀ + (c_u ⊙ T) w_upᵀ`` with ``T = Uᵀ w_downᵀ``: three GEMMs over all ``N·K``
    block columns at once (``6·D·H`` flops per column, what one JVP costs, at GEMM speed). Weight layout as
    :func:`~moe_lightning.geometry.swiglu_expert_jacobian`.
    """
    d_in, h = w_gate_DH.shape
    if w_up_DH.shape != (d_in, h) or w_down_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"swiglu_jacobian_operator: shapes x {tuple(x_ND.shape)}, w_gate {tuple(w_gate_DH.shape)}, "
            f"w_up {tuple(w_up_DH.shape)}, w_down {tuple(w_down_HD.shape)} are inconsistent"
        )
    n = x_ND.shape[0]
    a_NH = x_ND @ w_gate_DH
    b_NH = x_ND @ w_up_DH
    c_gate_N1H = (_silu_derivative(a_NH) * b_NH).unsqueeze(1)
    c_up_N1H = F.silu(a_NH).unsqueeze(1)

    c_gate_HN1, c_up_HN1 = (c.squeeze(1).t().unsqueeze(-1) for c in (c_gate_N1H, c_up_N1H))

    def apply(V_NIK: Tensor) -> Tensor:
        if _columns_layout(n * V_NIK.shape[-1], w_gate_DH):
            v = _cols(V_NIK)
            t_HNK = (w_gate_DH.t() @ v).view(h, n, -1) * c_gate_HN1
            t_HNK.addcmul_((w_up_DH.t() @ v).view(h, n, -1), c_up_HN1)
            return _uncols(w_down_HD.t() @ t_HNK.view(h, -1), n)
        v = _rows(V_NIK)
        t_NKH = (v @ w_gate_DH).view(n, -1, h) * c_gate_N1H
        t_NKH.addcmul_((v @ w_up_DH).view(n, -1, h), c_up_N1H)
        return _block(t_NKH.view(-1, h) @ w_down_HD, n)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        if _columns_layout(n * U_NOK.shape[-1], w_down_HD):
            t_HNK = (w_down_HD @ _cols(U_NOK)).view(h, n, -1)
            out = w_gate_DH @ (t_HNK * c_gate_HN1).view(h, -1)
            out.addmm_(w_up_DH, (t_HNK * c_up_HN1).view(h, -1))
            return _uncols(out, n)
        t_NKH = (_rows(U_NOK) @ w_down_HD.t()).view(n, -1, h)
        out = (t_NKH * c_gate_N1H).view(-1, h) @ w_gate_DH.t()
        out.addmm_((t_NKH * c_up_N1H).view(-1, h), w_up_DH.t())
        return _block(out, n)

    return JacobianOperator(apply, apply_transpose, n, d_in, w_down_HD.shape[1], x_ND.dtype, x_ND.device)


@dataclass
class TopRResult:
    """Result of :func:`topr_singular_values`.

    Attributes:
        values: ``(N, R)`` top singular values per token, descending.
        error_estimate: ``(N, R)`` residual norms ``‖J v_i − σ_i u_i‖``: each bounds ``|σ_i − σ_true|`` for some
            true singular value.
        iterations: subspace iterations run (the largest over tokens).
        converged: ``(N,)`` whether the relative change of every value fell to ``tol`` (at some iteration).
        right_vectors: ``(N, D_in, R)`` right singular vectors (only when requested).
        basis_columns: columns of the final basis per token (Krylov: each cost one product with ``J`` and one
            with ``Jᵀ``; subspace iteration: its block, ``K``).
    """

    values: Tensor
    error_estimate: Tensor
    iterations: int
    converged: Tensor
    right_vectors: Tensor | None = None
    basis_columns: int = 0


def compose_layer_operator(
    gates_NE: Tensor,
    gate_jacobian_NED: Tensor,
    expert_outputs: list[Tensor],
    expert_operators: list[tuple[Tensor, JacobianOperator | None]],
) -> JacobianOperator:
    """The MoE layer's Jacobians ``J = Σ_e g_e J_e + Σ_e f_e ∇g_eᵀ`` (docs/geometry.md §1) as products, unformed.

    The matrix-free counterpart of :func:`~moe_lightning.geometry.compose_layer_jacobian`: expert ``e``'s products
    run only on the tokens routed to it (``rows``), so a top-k layer costs k experts per token instead of the E
    that ``torch.func`` through the whole layer function pays; the router term is a rank-E product per token.

    Args:
        gates_NE: ``(N, E)`` gate weights.
        gate_jacobian_NED: ``(N, E, D_in)`` gate Jacobians ``∂g_e/∂x``.
        expert_outputs: ``E`` tensors ``(N, D_out)``, ``f_e(x)``.
        expert_operators: ``E`` pairs ``(rows, op)``: ``rows`` a ``(N,)`` bool mask of the tokens with
            ``g_e ≠ 0`` and ``op`` expert ``e``'s :class:`JacobianOperator` on exactly those tokens (None when
            there are none).
    """
    n, num_experts = gates_NE.shape
    d_in = gate_jacobian_NED.shape[-1]
    f_NEO = torch.stack(list(expert_outputs), dim=1)
    parts = []
    for e, (rows, op) in enumerate(expert_operators):
        idx = rows.nonzero().squeeze(-1)
        if idx.numel():
            if op is None or op.num_tokens != idx.numel():
                raise ValueError(f"compose_layer_operator: expert {e} has {idx.numel()} routed tokens but no operator")
            parts.append((idx, gates_NE[idx, e].view(-1, 1, 1), op))

    def apply(V_NIK: Tensor) -> Tensor:
        out_NOK = f_NEO.transpose(1, 2) @ (gate_jacobian_NED @ V_NIK)  # Σ_e f_e (∇g_eᵀ V)
        for idx, g, op in parts:
            out_NOK = out_NOK.index_add(0, idx, g * op.apply(V_NIK[idx]))
        return out_NOK

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        out_NIK = gate_jacobian_NED.transpose(1, 2) @ (f_NEO @ U_NOK)  # Σ_e ∇g_e (f_eᵀ U)
        for idx, g, op in parts:
            out_NIK = out_NIK.index_add(0, idx, g * op.apply_transpose(U_NOK[idx]))
        return out_NIK

    routed = [op.gemm_tokens or op.num_tokens for _, _, op in parts]
    return JacobianOperator(
        apply,
        apply_transpose,
        n,
        d_in,
        f_NEO.shape[-1],
        gate_jacobian_NED.dtype,
        gate_jacobian_NED.device,
        gemm_tokens=max(1, sum(routed) // len(routed)) if routed else None,
    )


def topr_singular_values(
    fn: Callable[[Tensor], Tensor] | JacobianOperator,
    x_ND: Tensor | None,
    r: int,
    *,
    oversample: int = 8,
    max_iter: int = 50,
    tol: float = 1e-10,
    seed: int = 0,
    return_vectors: bool = False,
    method: str = "krylov",
    block_size: int | None = None,
) -> TopRResult:
    """Top-``r`` singular values of ``J(x) = ∂fn/∂x`` at every token without forming ``J``.

    Args:
        fn: row-wise function ``(n, D_in) -> (n, D_out)`` (each output row depends on its input row only), or a
            :class:`JacobianOperator` (e.g. :func:`swiglu_jacobian_operator`), which already holds its tokens.
        x_ND: ``(N, D_in)`` tokens; ignored (may be None) when ``fn`` is an operator.
        r: number of singular values; capped at ``min(D_in, D_out)``.
        oversample: extra columns ``p``: ``K = r + p`` is the subspace iteration's block and the unit of
            ``max_iter`` (subspace rate ``(σ_{K+1}/σ_r)^2`` per iteration).
        max_iter: most iterations of a ``K``-column block (each one JVP block and one VJP block); the Krylov basis
            holds at most ``K · max_iter`` columns per token whatever ``block_size`` is (a smaller block runs
            proportionally more, cheaper iterations).
        tol: a token has converged once, for each of its top-``r`` values, either the relative change over the last
            ``K`` basis columns (one iteration at ``block_size = K``) is at most ``tol``, or (Krylov) the change
            still to come, extrapolated from its last three changes as a geometric tail, is (see
            ``_extrapolated_converged``); latched: rounding noise later cannot undo it. The run stops when every
            token has. Floored at ``16·eps`` of the dtype (float32: 1.9e-6), below which successive Ritz values
            differ by rounding alone and a batch would run to the end.
        seed: seed of the random start block (a local generator; global RNG state is untouched).
        return_vectors: also return the right singular vectors.
        method: ``"krylov"`` (randomized block Krylov, default) or ``"subspace"`` (subspace iteration).
        block_size: Krylov columns added per token and iteration. A Krylov basis grows one polynomial degree per
            block, so small blocks reach a given accuracy with fewer columns in all, but a block of ``b`` columns
            per token makes GEMMs of ``N·b`` columns against the weights, which run far below their full rate per
            column under ~32 columns (docs/benchmarks/geometry.md). Default (None): the smallest block of at least 4
            with ``N·b >= 32``, at most ``K`` (1 token: ``K``; 2: 16; 4: 8; 8 or more: 4), where ``N`` is the
            operator's ``gemm_tokens`` when it has them (a composed layer operator: the experts' mean routed tokens).
            A block smaller than the multiplicity of a singular value finds only ``block_size`` copies of it until
            rounding supplies the rest; pass ``block_size=K`` for matrices with exactly repeated top values.
            Ignored by ``"subspace"``.

    Returns:
        A :class:`TopRResult`.

    Example:
        >>> W = torch.randn(64, 64, dtype=torch.float64)
        >>> res = topr_singular_values(lambda x: x @ W.T, torch.zeros(1, 64, dtype=torch.float64), 4)
        >>> torch.allclose(res.values[0], torch.linalg.svdvals(W)[:4])
        True
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"topr_singular_values: r must be an int >= 1, got {r!r}")
    if oversample < 0 or max_iter < 1 or tol < 0:
        raise ValueError(
            f"topr_singular_values: need oversample >= 0, max_iter >= 1, tol >= 0; "
            f"got oversample={oversample!r}, max_iter={max_iter!r}, tol={tol!r}"
        )
    if method not in ("krylov", "subspace"):
        raise ValueError(f"topr_singular_values: method must be 'krylov' or 'subspace', got {method!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"topr_singular_values: block_size must be None or an int >= 1, got {block_size!r}")
    if isinstance(fn, JacobianOperator):
        op = fn
    elif x_ND is None or x_ND.dim() != 2:
        raise ValueError("topr_singular_values: x_ND must be an (N, D) tensor when fn is a function")
    elif x_ND.shape[0] == 0:
        with torch.no_grad():
            d_out = fn(x_ND).shape[-1]
        r = min(r, x_ND.shape[1], d_out)
        empty = x_ND.new_zeros(0, r)
        return TopRResult(empty, empty.clone(), 0, torch.zeros(0, dtype=torch.bool, device=x_ND.device))
    else:
        op = func_jacobian_operator(fn, x_ND)
    n, d_in, d_out, dtype, device = op.num_tokens, op.d_in, op.d_out, op.dtype, op.device
    r = min(r, d_in, d_out)
    k = min(r + oversample, d_in, d_out)
    tol = max(tol, 16 * torch.finfo(dtype).eps)
    if n == 0:
        empty = torch.zeros(0, r, dtype=dtype, device=device)
        return TopRResult(empty, empty.clone(), 0, torch.zeros(0, dtype=torch.bool, device=device))
    J, Jt = op.apply, op.apply_transpose

    gen = torch.Generator(device=device).manual_seed(seed)
    b = k if method == "subspace" else _krylov_block(op.gemm_tokens or n, k, block_size)
    omega = torch.randn(n, d_in, b, generator=gen, dtype=dtype, device=device)
    if method == "krylov":
        Q, Z, it, converged = _block_krylov(J, Jt, omega, r, k, max_iter, tol, min(d_in, d_out))
    else:
        Q, Z, it, converged = _subspace_iteration(J, Jt, omega, r, max_iter, tol)
    # Rayleigh–Ritz: Qᵀ J = Zᵀ = U_b Σ V_bᵀ, so σ_i with v_i = V_b[:, i] and u_i = Q U_b[:, i].
    V_b, S, U_bT = torch.linalg.svd(Z, full_matrices=False)  # Z = V_b S U_bᵀ
    V_r = V_b[:, :, :r]
    U_r = Q @ U_bT.transpose(-1, -2)[:, :, :r]
    S_r = S[:, :r]
    residual = torch.linalg.vector_norm(J(V_r) - U_r * S_r.unsqueeze(1), dim=1)
    return TopRResult(S_r, residual, it, converged, V_r if return_vectors else None, Q.shape[-1])


def _relative_change(sigma: Tensor, prev: Tensor) -> Tensor:
    change = (sigma - prev).abs()
    return torch.where(sigma > 0, change / torch.where(sigma > 0, sigma, torch.ones_like(sigma)), change)


def _extrapolated_converged(last4: list[Tensor], tol: float, noise: float) -> Tensor:
    """Per token: is every value's remaining change, extrapolated from its last three changes, at most ``tol``?

    Krylov Ritz values rise monotonically to the true values, and once a value converges its successive changes
    ``Δ`` shrink at least geometrically, so what is left to come is about ``Δ·ρ/(1 − ρ)`` with ``ρ`` the larger of
    the last two ratios of changes (Aitken's estimate of a geometric tail). A stall (``ρ ≥ 1``) counts as not
    converged; a last change below ``noise`` (relative: the rounding floor, where changes are noise and their
    ratios mean nothing) as converged. This stops a run within a block or two of where the values reach ``tol``
    instead of after another ``K`` columns without change.
    """
    s0, s1, s2, s3 = last4
    floor = noise * s3
    d1, d2, d3 = ((b - a).abs() for a, b in ((s0, s1), (s1, s2), (s2, s3)))
    rho = torch.maximum(d2 / d1, d3 / d2).nan_to_num(nan=0.0)  # 0/0: no change at all
    tail = torch.where(rho < 1, d3 * rho / (1 - rho), torch.full_like(d3, float("inf")))
    return ((tail <= tol * s3) | (d3 <= floor)).all(-1)


def _subspace_iteration(J, Jt, omega, r, max_iter, tol):
    """Halko et al. (2011) Alg. 4.4: Q ← orth(J orth(Jᵀ Q)); rate (σ_{k+1}/σ_i)² per iteration."""
    Y = J(omega)
    prev = None
    converged = torch.zeros(omega.shape[0], dtype=torch.bool, device=omega.device)
    it = 0
    while True:
        it += 1
        Q, _ = torch.linalg.qr(Y)  # (N, D_out, K)
        Z = Jt(Q)  # (N, D_in, K) = (Qᵀ J)ᵀ
        sigma = batched_svdvals(Z)[:, :r]
        if prev is not None:
            converged |= (_relative_change(sigma, prev) <= tol).all(-1)  # latched per token
        if bool(converged.all()) or it >= max_iter:
            return Q, Z, it, converged
        prev = sigma
        P, _ = torch.linalg.qr(Z)
        Y = J(P)


_SMALL_BLOCK = 4  # smallest default Krylov block per token (fewest columns in all to reach a given accuracy)
_WIDE_GEMM = 32  # columns from which a GEMM against a (D, H) weight runs near its full rate on CPU


def _krylov_block(n: int, k: int, block_size: int | None) -> int:
    """Columns per token and Krylov iteration: ``block_size`` (at most ``k``), or the default policy: the smallest
    block of at least :data:`_SMALL_BLOCK` whose ``n · block`` columns fill a :data:`_WIDE_GEMM`-wide GEMM (1 token:
    ``k``, 2 tokens: 16, 4 tokens: 8, 8 or more: 4)."""
    if block_size is None:
        block_size = max(_SMALL_BLOCK, -(-_WIDE_GEMM // n))
    return min(block_size, k)


def _krylov_bytes_per_token(d: int, k: int, max_iter: int, itemsize: int) -> int:
    """Peak bytes per token of :func:`_block_krylov` and the Rayleigh–Ritz step for ``d × d`` Jacobians: the
    bases ``Q`` and ``Z = Jᵀ Q`` (at most ``min(d, k·max_iter)`` columns each), a float64 copy of ``Z`` when the
    dtype is narrower, the Ritz SVD's output and workspace, and the ``c × c`` float64 Gram matrix (with the copy
    that grows it)."""
    cols = min(d, k * max_iter)
    return d * cols * (4 * itemsize + (8 if itemsize < 8 else 0)) + 16 * cols * cols


class _Basis:
    """Growing ``(N, rows, capacity)`` column storage (doubling, so appending is amortised O(1) per column)."""

    def __init__(self, like: Tensor, rows: int, capacity: int, dtype: torch.dtype | None = None):
        self.data = like.new_empty(like.shape[0], rows, capacity, dtype=dtype or like.dtype)
        self.cols = 0

    def append(self, block: Tensor, limit: int) -> None:
        need = self.cols + block.shape[-1]
        if need > self.data.shape[-1]:
            grown = self.data.new_empty(*self.data.shape[:2], min(limit, max(need, 2 * self.data.shape[-1])))
            grown[..., : self.cols] = self.data[..., : self.cols]
            self.data = grown
        self.data[..., self.cols : need] = block
        self.cols = need

    def view(self) -> Tensor:
        return self.data[..., : self.cols]


def _block_krylov(J, Jt, omega, r, k, max_iter, tol, max_dim):
    """Randomized block Krylov (Musco & Musco, NeurIPS 2015): Q spans [JΩ, (JJᵀ)JΩ, (JJᵀ)²JΩ, ...].

    Converges far faster than subspace iteration for a slowly decaying spectrum, at the same cost per column.
    ``Ω`` has ``b`` columns per token (the block); the basis holds at most ``k · max_iter`` columns. The
    ``Z = Jᵀ Q`` products are kept, so the Ritz values of the whole basis come at no extra product cost: each
    iteration adds the new columns' inner products to the Gram matrix ``ZᵀZ = Qᵀ J Jᵀ Q`` (in float64, from the
    products as computed) and takes the eigenvalues ``σ²`` of that ``c × c`` matrix for the convergence check,
    instead of an SVD of the ``D × c`` basis (which at large ``D`` costs more than the products themselves); the
    caller's Rayleigh–Ritz SVD of ``Z`` gives the returned values. Blocks are re-orthogonalised twice against the basis
    ("twice is enough", Giraud et al. 2005).
    """
    n, d_in, b = omega.shape
    max_cols = min(max_dim, k * max_iter)
    lag = -(-k // b)  # iterations per k columns: values are compared with those k columns earlier
    Y = J(omega)
    capacity = min(max_cols, 8 * k)
    Qs, Zs = _Basis(Y, Y.shape[1], capacity), _Basis(Y, d_in, capacity)
    Z64 = Zs if Y.dtype == torch.float64 else _Basis(Y, d_in, capacity, torch.float64)
    G = Y.new_zeros(n, 0, 0, dtype=torch.float64)
    history: list[Tensor] = []
    converged = torch.zeros(n, dtype=torch.bool, device=Y.device)
    it = 0
    while True:
        it += 1
        Q_new = torch.linalg.qr(Y)[0]
        Qs.append(Q_new, max_cols)
        Z_new = Jt(Q_new)
        Zs.append(Z_new, max_cols)
        if Z64 is not Zs:
            Z64.append(Z_new, max_cols)
        c, c_old = Qs.cols, G.shape[1]
        cross = Z64.view().transpose(-1, -2) @ Z64.view()[..., c_old:]  # (n, c, c - c_old): G's new columns
        G = torch.cat([torch.cat([G, cross[:, :c_old]], 2), cross.transpose(-1, -2)], 1)
        if c >= r:
            sigma = torch.linalg.eigvalsh(G)[:, -r:].flip(-1).clamp_min(0).sqrt()
            if len(history) >= lag:
                converged |= (_relative_change(sigma, history[-lag]) <= tol).all(-1)  # latched per token
            history = history[-max(lag, 3) :] + [sigma]
            if len(history) >= 4:
                converged |= _extrapolated_converged(history[-4:], tol, 16 * torch.finfo(Y.dtype).eps)
        if c >= max_dim:  # the basis spans the whole space: the Ritz values are exact
            converged = torch.ones_like(converged)
        if bool(converged.all()) or c >= max_cols:
            return Qs.view(), Zs.view(), it, converged
        Q = Qs.view()
        Y = J(Z_new[..., : max_cols - c])  # (J Jᵀ) Q_last, trimmed to fill the space exactly
        for _ in range(2):
            Y = Y - Q @ (Q.transpose(-1, -2) @ Y)
