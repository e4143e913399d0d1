"""Top-r singular values of per-token Jacobians without forming them (docs/geometry.md §1, "When d is too large
to form J"): randomized block Krylov and block subspace iteration on :class:`~moe_lightning.geometry.JacobianOperator`
products, :func:`topr_singular_values` and its :class:`TopRResult`.

Shape legend: ``N`` tokens, ``D`` model dim (``D_in``/``D_out``), ``R`` requested singular values, ``K = R + p``
the block size with oversampling ``p``.

Randomized block Krylov iteration (Musco & Musco 2015; or block subspace iteration, Halko, Martinsson & Tropp
2011, Alg. 4.4) is built only on Jacobian-vector products (``J V``) and vector-Jacobian products (``Jᵀ U``); all
tokens run at once. The Ritz values of the Rayleigh–Ritz step are the estimates; the residual ``‖J v_i − σ_i u_i‖``
of each Ritz triplet bounds the distance to a true singular value (the Ritz pair is exact for ``Jᵀ``, and for the
symmetric augmented matrix ``[[0, J], [Jᵀ, 0]]`` an eigenpair residual bounds the eigenvalue error; Parlett,
*The Symmetric Eigenvalue Problem*, Thm. 4.5.1), so it is returned as the error estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.geometry.operators import JacobianOperator, func_jacobian_operator
from moe_lightning.geometry.spectra import batched_svdvals

__all__ = ["TopRResult", "krylov_bytes_per_token", "topr_singular_values"]


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
            token has. Floored at ``16·eps`` of the dtype the products round in (the operator's ``rounding``, else
            its dtype; float32: 1.9e-6), below which successive Ritz values differ by rounding alone and a batch
            would run to the end.
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
    _check_topr_arguments(r, oversample, max_iter, tol, method, block_size)
    if isinstance(fn, JacobianOperator):
        op = fn
    elif x_ND is None or x_ND.dim() != 2:
        raise ValueError("topr_singular_values: x_ND must be an (N, D) tensor when fn is a function")
    elif x_ND.shape[0] == 0:
        with torch.no_grad():
            d_out = fn(x_ND).shape[-1]
        return _empty_result(min(r, x_ND.shape[1], d_out), x_ND.dtype, x_ND.device)
    else:
        op = func_jacobian_operator(fn, x_ND)
    n, d_in, d_out, dtype, device = op.num_tokens, op.d_in, op.d_out, op.dtype, op.device
    r = min(r, d_in, d_out)
    k = min(r + oversample, d_in, d_out)
    # The rounding floor is the products' (a casting operator's products round in a narrower dtype than it gives).
    noise = 16 * torch.finfo(op.rounding or dtype).eps
    tol = max(tol, noise)
    if n == 0:
        return _empty_result(r, dtype, device)
    J, Jt = op.apply, op.apply_transpose
    gen = torch.Generator(device=device).manual_seed(seed)
    b = k if method == "subspace" else _krylov_block(op.gemm_tokens or n, k, block_size)
    omega = torch.randn(n, d_in, b, generator=gen, dtype=dtype, device=device)
    if method == "krylov":
        store = op.rounding or dtype
        Q, Z, it, converged = _block_krylov(J, Jt, omega, r, k, max_iter, tol, min(d_in, d_out), noise, store)
    else:
        Q, Z, it, converged = _subspace_iteration(J, Jt, omega, r, max_iter, tol)
    S_r, residual, V_r = _rayleigh_ritz(J, Q, Z, r, dtype)
    return TopRResult(S_r, residual, it, converged, V_r if return_vectors else None, Q.shape[-1])


def _empty_result(r: int, dtype: torch.dtype, device: torch.device) -> TopRResult:
    empty = torch.zeros(0, r, dtype=dtype, device=device)
    return TopRResult(empty, empty.clone(), 0, torch.zeros(0, dtype=torch.bool, device=device))


def _check_topr_arguments(
    r: int, oversample: int, max_iter: int, tol: float, method: str, block_size: int | None
) -> None:
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


def _rayleigh_ritz(
    J: Callable[[Tensor], Tensor], Q: Tensor, Z: Tensor, r: int, op_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``r`` Ritz values of the basis ``Q`` (``Z = Jᵀ Q``), their residuals ``‖J v_i − σ_i u_i‖`` and
    right vectors ``v_i``: ``Qᵀ J = Zᵀ = U_b Σ V_bᵀ``, so ``σ_i`` with ``v_i = V_b[:, i]``, ``u_i = Q U_b[:, i]``."""
    # One token at a time, so that the SVD's output and workspace are one token's, not the batch's; bases kept in a
    # narrower dtype than the operator's are cast one token at a time.
    dtype = op_dtype or Z.dtype
    S_r, V_r = Z.new_empty(Z.shape[0], r, dtype=dtype), Z.new_empty(*Z.shape[:2], r, dtype=dtype)
    U_r = Q.new_empty(*Q.shape[:2], r, dtype=dtype)
    for t in range(Z.shape[0]):
        V_b, S, U_bT = torch.linalg.svd(Z[t].to(dtype), full_matrices=False)  # Z = V_b S U_bᵀ
        V_r[t], S_r[t], U_r[t] = V_b[:, :r], S[:r], Q[t].to(dtype) @ U_bT.T[:, :r]
    residual = torch.linalg.vector_norm(J(V_r) - U_r * S_r.unsqueeze(1), dim=1)
    return S_r, residual, V_r


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


SMALL_BLOCK = 4  # smallest default Krylov block per token (fewest columns in all to reach a given accuracy)
_WIDE_GEMM = 32  # columns from which a GEMM against a (D, H) weight runs near its full rate on CPU


def _krylov_block(n: int, k: int, block_size: int | None) -> int:
    """Columns per token and Krylov iteration: ``block_size`` (at most ``k``), or the default policy: the smallest
    block of at least :data:`SMALL_BLOCK` whose ``n · block`` columns fill a :data:`_WIDE_GEMM`-wide GEMM (1 token:
    ``k``, 2 tokens: 16, 4 tokens: 8, 8 or more: 4)."""
    if block_size is None:
        block_size = max(SMALL_BLOCK, -(-_WIDE_GEMM // n))
    return min(block_size, k)


def krylov_bytes_per_token(
    d: int, k: int, max_iter: int, itemsize: int, products_itemsize: int | None = None, block: int | None = None
) -> int:
    """Peak bytes per token of :func:`_block_krylov` and the Rayleigh–Ritz step for ``d × d`` Jacobians: the
    bases ``Q`` and ``Z = Jᵀ Q`` (at most ``c = min(d, k·max_iter)`` columns each) in the dtype the products round
    in (``products_itemsize``; default ``itemsize``, the operator's), the pieces of them cast to float64 for the
    projections and the Gram's new columns, the blocks in flight (``block`` columns each; default ``k``, the
    largest), and the ``c × c`` float64 Gram matrix (with the copy that grows it and its eigensolver's workspace).
    The Ritz SVD runs one token at a time: its output and workspace are not per token."""
    cols = min(d, k * max_iter)
    kept = products_itemsize or itemsize
    return d * (2 * kept * cols + 8 * (2 * _GRAM_PIECE + 4 * (block or k))) + 24 * cols * cols


_GRAM_PIECE = 16  # columns of Z cast to float64 at a time for the Gram's new columns


def _transposed_product(Q: Tensor, Y: Tensor) -> Tensor:
    """``Qᵀ Y`` in ``Y``'s dtype, a ``Q`` kept in another dtype cast :data:`_GRAM_PIECE` columns at a time (a cast
    copy of the whole basis would double a float32 basis's memory)."""
    if Q.dtype == Y.dtype:
        return Q.transpose(-1, -2) @ Y
    return torch.cat([piece.to(Y.dtype).transpose(-1, -2) @ Y for piece in Q.split(_GRAM_PIECE, -1)], -2)


def _project_out(Q: Tensor, Y: Tensor) -> Tensor:
    """``Y − Q (Qᵀ Y)`` in ``Y``'s dtype (one classical Gram–Schmidt pass), a narrower ``Q`` cast a piece at a time."""
    coefficients = _transposed_product(Q, Y)
    if Q.dtype == Y.dtype:
        return Y - Q @ coefficients
    for piece, c in zip(Q.split(_GRAM_PIECE, -1), coefficients.split(_GRAM_PIECE, -2), strict=True):
        Y = Y - piece.to(Y.dtype) @ c
    return Y


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


def _block_krylov(J, Jt, omega, r, k, max_iter, tol, max_dim, noise, store):
    """Randomized block Krylov (Musco & Musco, NeurIPS 2015): Q spans [JΩ, (JJᵀ)JΩ, (JJᵀ)²JΩ, ...].

    Converges far faster than subspace iteration for a slowly decaying spectrum, at the same cost per column.
    ``Ω`` has ``b`` columns per token (the block); the basis holds at most ``k · max_iter`` columns, kept with
    the ``Z = Jᵀ Q`` products in ``store`` (the dtype the products round in). As ``Z`` is kept, the Ritz values of
    the whole basis come at no extra product cost: each iteration adds the new columns' inner products to the
    Gram matrix ``ZᵀZ = Qᵀ J Jᵀ Q`` (in float64, from the products as computed) and takes
    the eigenvalues ``σ²`` of that ``c × c`` matrix for the convergence check, instead of an SVD of the ``D × c``
    basis (which at large ``D`` costs more than the products themselves); the caller's Rayleigh–Ritz SVD of ``Z``
    gives the returned values. Blocks are re-orthogonalised twice against the basis ("twice is enough", Giraud et
    al. 2005).
    """
    n, d_in, b = omega.shape
    max_cols = min(max_dim, k * max_iter)
    lag = -(-k // b)  # iterations per k columns: values are compared with those k columns earlier
    Y = J(omega)
    capacity = min(max_cols, 8 * k)
    # The bases are kept in the dtype the products round in (``store``): a casting operator's products are values
    # of that dtype, and its products with Q see Q rounded to it, so the kept bases are what the products saw; in
    # float32 they hold half the memory of float64 ones. The projections and the Gram run in the operator's dtype.
    Qs, Zs = _Basis(Y, Y.shape[1], capacity, store), _Basis(Y, d_in, capacity, store)
    G = Y.new_zeros(n, 0, 0, dtype=torch.float64)
    history: list[Tensor] = []
    converged = torch.zeros(n, dtype=torch.bool, device=Y.device)
    it = 0
    while True:
        it += 1
        Q_new = torch.linalg.qr(Y)[0]
        if Qs.cols:
            # Once the basis nearly spans the space, Y is rounding left after the projections, and its QR
            # normalises that rounding into columns far from orthogonal to the basis; one more projection and QR
            # makes them orthonormal to it, so a basis that fills the whole space gives exact Ritz values.
            Q_new = torch.linalg.qr(_project_out(Qs.view(), Q_new))[0]
        Qs.append(Q_new, max_cols)
        Z_new = Jt(Q_new)
        Zs.append(Z_new, max_cols)
        c, c_old = Qs.cols, G.shape[1]
        # G's new columns (n, c, c - c_old), in float64 from the products as computed
        cross = _transposed_product(Zs.view(), Z_new.to(torch.float64))
        G = torch.cat([torch.cat([G, cross[:, :c_old]], 2), cross.transpose(-1, -2)], 1)
        if c >= r:
            sigma = torch.linalg.eigvalsh(G)[:, -r:].flip(-1).clamp_min(0).sqrt()
            if len(history) >= lag:
                converged |= (_relative_change(sigma, history[-lag]) <= tol).all(-1)  # latched per token
            history = history[-max(lag, 3) :] + [sigma]
            if len(history) >= 4:
                converged |= _extrapolated_converged(history[-4:], tol, noise)
        if c >= max_dim:  # the basis spans the whole space: the Ritz values are exact
            converged = torch.ones_like(converged)
        if bool(converged.all()) or c >= max_cols:
            return Qs.view(), Zs.view(), it, converged
        Y = J(Z_new[..., : max_cols - c])  # (J Jᵀ) Q_last, trimmed to fill the space exactly
        for _ in range(2):
            Y = _project_out(Qs.view(), Y)
