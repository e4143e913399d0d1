"""Matrix-free top-r singular values of per-token Jacobians (GEOMETRY.md §1, "When d is too large to form J").

Shape legend: ``N`` tokens, ``D`` model dim (``D_in``/``D_out``), ``R`` requested singular values, ``K = R + p``
the block size with oversampling ``p``.

Randomized block Krylov iteration (Musco & Musco 2015; or block subspace iteration, Halko, Martinsson & Tropp
2011, Alg. 4.4) built only on Jacobian-vector
products (``torch.func.jvp``, giving ``J V``) and vector-Jacobian products (``torch.func.vjp``, giving ``Jᵀ U``).
All tokens run at once: for a row-wise function one batched JVP/VJP with a ``(N, D)`` tangent gives every token's
own product, and ``vmap`` over the ``K`` block columns turns matrix-vector products into matrix-matrix products.
The Ritz values of the Rayleigh–Ritz step are the estimates; the residual ``‖J v_i − σ_i u_i‖`` of each Ritz
triplet bounds the distance to a true singular value (the Ritz pair is exact for ``Jᵀ``, and for the symmetric
augmented matrix ``[[0, J], [Jᵀ, 0]]`` an eigenpair residual bounds the eigenvalue error; Parlett,
*The Symmetric Eigenvalue Problem*, Thm. 4.5.1), so it is returned as the error estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

__all__ = ["TopRResult", "topr_singular_values"]


@dataclass
class TopRResult:
    """Result of :func:`topr_singular_values`.

    Attributes:
        values: ``(N, R)`` top singular values per token, descending.
        error_estimate: ``(N, R)`` residual norms ``‖J v_i − σ_i u_i‖``: each bounds ``|σ_i − σ_true|`` for some
            true singular value.
        iterations: subspace iterations run (the largest over tokens).
        converged: ``(N,)`` whether the relative change of every value fell below ``tol``.
        right_vectors: ``(N, D_in, R)`` right singular vectors (only when requested).
    """

    values: Tensor
    error_estimate: Tensor
    iterations: int
    converged: Tensor
    right_vectors: Tensor | None = None


def topr_singular_values(
    fn: Callable[[Tensor], Tensor],
    x_ND: Tensor,
    r: int,
    *,
    oversample: int = 8,
    max_iter: int = 50,
    tol: float = 1e-10,
    seed: int = 0,
    return_vectors: bool = False,
    method: str = "krylov",
) -> TopRResult:
    """Top-``r`` singular values of ``J(x) = ∂fn/∂x`` at every token without forming ``J``.

    Args:
        fn: row-wise function ``(n, D_in) -> (n, D_out)`` (each output row depends on its input row only).
        x_ND: ``(N, D_in)`` tokens.
        r: number of singular values; capped at ``min(D_in, D_out)``.
        oversample: extra block columns ``p`` (convergence rate ``(σ_{r+p+1}/σ_r)^2`` per iteration).
        max_iter: most subspace iterations (each one JVP block and one VJP block).
        tol: stop when the relative change of every top-``r`` value between iterations is below ``tol``.
        seed: seed of the random start block (a local generator; global RNG state is untouched).
        return_vectors: also return the right singular vectors.
        method: ``"krylov"`` (randomized block Krylov, default) or ``"subspace"`` (subspace iteration).

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
    n, d_in = x_ND.shape
    with torch.no_grad():
        y = fn(x_ND)
    d_out = y.shape[-1]
    r = min(r, d_in, d_out)
    k = min(r + oversample, d_in, d_out)
    dtype, device = x_ND.dtype, x_ND.device
    if n == 0:
        empty = x_ND.new_zeros(0, r)
        return TopRResult(empty, empty.clone(), 0, torch.zeros(0, dtype=torch.bool, device=device))

    _, vjp_fn = vjp(fn, x_ND)

    def J(V_NIK: Tensor) -> Tensor:  # (N, D_in, K) -> (N, D_out, K)
        out = vmap(lambda v: jvp(fn, (x_ND,), (v,))[1])(V_NIK.permute(2, 0, 1))
        return out.permute(1, 2, 0)

    def Jt(U_NOK: Tensor) -> Tensor:  # (N, D_out, K) -> (N, D_in, K)
        out = vmap(lambda u: vjp_fn(u)[0])(U_NOK.permute(2, 0, 1))
        return out.permute(1, 2, 0)

    gen = torch.Generator(device=device).manual_seed(seed)
    omega = torch.randn(n, d_in, k, generator=gen, dtype=dtype, device=device)
    if method == "krylov":
        Q, Z, it, converged = _block_krylov(J, Jt, omega, r, max_iter, tol, min(d_in, d_out))
    else:
        Q, Z, it, converged = _subspace_iteration(J, Jt, omega, r, max_iter, tol)
    # Rayleigh–Ritz: Qᵀ J = Zᵀ = U_b Σ V_bᵀ, so σ_i with v_i = V_b[:, i] and u_i = Q U_b[:, i].
    V_b, S, U_bT = torch.linalg.svd(Z, full_matrices=False)  # Z = V_b S U_bᵀ
    V_r = V_b[:, :, :r]
    U_r = Q @ U_bT.transpose(-1, -2)[:, :, :r]
    S_r = S[:, :r]
    residual = torch.linalg.vector_norm(J(V_r) - U_r * S_r.unsqueeze(1), dim=1)
    return TopRResult(S_r, residual, it, converged, V_r if return_vectors else None)


def _relative_change(sigma: Tensor, prev: Tensor) -> Tensor:
    change = (sigma - prev).abs()
    return torch.where(sigma > 0, change / torch.where(sigma > 0, sigma, torch.ones_like(sigma)), change)


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
        sigma = torch.linalg.svdvals(Z)[:, :r]
        if prev is not None:
            converged = (_relative_change(sigma, prev) <= tol).all(-1)
        if bool(converged.all()) or it >= max_iter:
            return Q, Z, it, converged
        prev = sigma
        P, _ = torch.linalg.qr(Z)
        Y = J(P)


def _block_krylov(J, Jt, omega, r, max_iter, tol, max_dim):
    """Randomized block Krylov (Musco & Musco, NeurIPS 2015): Q spans [JΩ, (JJᵀ)JΩ, (JJᵀ)²JΩ, ...].

    Converges far faster than subspace iteration for a slowly decaying spectrum, at the same cost per iteration
    (one J block and one Jᵀ block). The ``Jᵀ Q_i`` products are kept, so the Ritz values of the whole basis come
    at no extra product cost each iteration. Blocks are re-orthogonalised twice against the basis ("twice is
    enough", Giraud et al. 2005).
    """
    Q_blocks, Z_blocks = [torch.linalg.qr(J(omega))[0]], []
    prev = None
    converged = torch.zeros(omega.shape[0], dtype=torch.bool, device=omega.device)
    it = 0
    while True:
        it += 1
        Z_blocks.append(Jt(Q_blocks[-1]))
        Q, Z = torch.cat(Q_blocks, -1), torch.cat(Z_blocks, -1)
        sigma = torch.linalg.svdvals(Z)[:, :r]
        if prev is not None:
            converged = (_relative_change(sigma, prev) <= tol).all(-1)
        if Q.shape[-1] >= max_dim:  # the basis spans the whole space: the Ritz values are exact
            converged = torch.ones_like(converged)
        if bool(converged.all()) or it >= max_iter:
            return Q, Z, it, converged
        prev = sigma
        Y = J(Z_blocks[-1][..., : max_dim - Q.shape[-1]])  # (J Jᵀ) Q_last, trimmed to fill the space exactly
        for _ in range(2):
            Y = Y - Q @ (Q.transpose(-1, -2) @ Y)
        Q_blocks.append(torch.linalg.qr(Y)[0])
