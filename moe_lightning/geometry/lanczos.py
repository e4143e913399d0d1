"""Lanczos (1950) for extreme eigenvalues of a symmetric operator given only its matrix-vector product, with full
reorthogonalisation and a residual stopping rule per eigenvalue (docs/geometry.md §7).

Shape legend: ``P`` operator dimension (number of parameters), ``M`` Krylov steps run, ``K`` eigenvalues wanted.

Full reorthogonalisation (two passes of classical Gram–Schmidt against the whole basis) keeps the basis orthonormal
in floating point, so no ghost copies of converged Ritz values appear; the price is an ``(M, P)`` basis in memory.
For a Ritz pair ``(θ_i, y_i = Q s_i)`` of the tridiagonal ``T_M`` the residual is
``‖A y_i − θ_i y_i‖ = β_M |s_{M,i}|`` (Parlett, *The Symmetric Eigenvalue Problem*, §13.1), which bounds the distance
of ``θ_i`` to a true eigenvalue; it costs no extra product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.common import check_choice, check_nonnegative, check_positive_int

__all__ = ["WHICH", "LanczosResult", "lanczos", "tridiagonal"]

WHICH = ("largest", "smallest", "both", "magnitude")


@dataclass
class LanczosResult:
    """Result of :func:`lanczos`.

    Attributes:
        eigenvalues: ``(K',)`` Ritz values wanted: ``largest`` descending, ``smallest`` ascending, ``both`` the
            ``k`` largest descending then the ``k`` smallest ascending, ``magnitude`` by decreasing ``|θ|``.
        residuals: ``(K',)`` residual norms ``‖A y − θ y‖`` of those Ritz pairs.
        converged: ``(K',)`` whether ``residual ≤ tol · |θ|``.
        iterations: Krylov steps run, one matrix-vector product each.
        alpha: ``(M,)`` diagonal of the tridiagonal ``T_M``.
        beta: ``(M - 1,)`` its off-diagonal.
        eigenvectors: ``(P, K')`` Ritz vectors (only with ``return_vectors``).
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    iterations: int
    alpha: Tensor
    beta: Tensor
    eigenvectors: Tensor | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta`` (float64)."""
    t = torch.diag(alpha.double())
    if len(beta):
        t += torch.diag(beta.double(), 1) + torch.diag(beta.double(), -1)
    return t


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted Ritz values of ascending ``theta``."""
    m = len(theta)
    k = min(k, m)
    idx = torch.arange(m)
    if which == "largest":
        return idx.flip(0)[:k]
    if which == "smallest":
        return idx[:k]
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True, stable=True)[:k]
    top = idx.flip(0)[:k]
    bottom = [i for i in idx[: min(k, m - k)].tolist()]  # a small basis cannot give 2k distinct values
    return torch.cat([top, torch.tensor(bottom, dtype=torch.long)])


def _ritz(alpha: list[float], beta: list[float], b_last: float, k: int, which: str, tol: float):
    theta, s = torch.linalg.eigh(
        tridiagonal(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))
    )
    idx = _wanted(theta, k, which)
    residuals = b_last * s[-1, idx].abs()
    converged = residuals <= tol * theta[idx].abs()
    return theta, s, idx, residuals, converged


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    *,
    k: int = 1,
    which: str = "largest",
    max_iter: int = 100,
    tol: float = 1e-3,
    return_vectors: bool = False,
) -> LanczosResult:
    """Extreme eigenvalues of the symmetric operator ``matvec`` by Lanczos with full reorthogonalisation.

    Stops once every wanted Ritz pair has ``‖A y − θ y‖ ≤ tol · |θ|`` (checked after each product), after
    ``max_iter`` products, or when the Krylov space is invariant (then the values are exact). ``tol = 0`` runs
    exactly ``min(max_iter, P)`` steps, as stochastic Lanczos quadrature wants.

    Args:
        matvec: ``(P,) -> (P,)`` product with a symmetric matrix.
        v0: ``(P,)`` start vector (normalised here); its dtype and device are the basis's.
        k: eigenvalues wanted (per end with ``which="both"``).
        which: ``largest``, ``smallest``, ``both`` or ``magnitude``.
        max_iter: most Krylov steps (the basis holds at most this many ``P``-vectors).
        tol: relative residual tolerance.
        return_vectors: also return the Ritz vectors.
    """
    check_positive_int("lanczos: k", k)
    check_positive_int("lanczos: max_iter", max_iter)
    check_choice("lanczos: which", which, WHICH)
    check_nonnegative("lanczos: tol", tol)
    if v0.ndim != 1 or not torch.isfinite(v0).all() or float(v0.norm()) == 0.0:
        raise ValueError("lanczos: v0 must be a finite, non-zero 1-D tensor")
    n = v0.numel()
    steps = min(max_iter, n)
    basis = torch.empty(steps, n, dtype=v0.dtype, device=v0.device)
    q = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    b = 0.0
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        a = float(q @ w)
        w = w - a * q - (b * basis[j - 1] if j else 0.0)
        q_basis = basis[: j + 1]
        for _ in range(2):  # twice is enough (Kahan–Parlett "twice is enough"); once loses orthogonality
            w = w - q_basis.T @ (q_basis @ w)
        b = float(w.norm())
        if not (math.isfinite(a) and math.isfinite(b)):
            raise FloatingPointError(f"lanczos: non-finite matrix-vector product at step {j + 1}")
        alpha.append(a)
        invariant = b <= 1e-12 * max(abs(x) for x in alpha) or j + 1 == n
        wanted_size = 2 * k if which == "both" else k
        check = (tol > 0 and j + 1 >= wanted_size) or invariant or j + 1 == steps
        if check:
            theta, s, idx, residuals, converged = _ritz(alpha, beta, 0.0 if invariant else b, k, which, tol)
            if invariant or j + 1 == steps or (tol > 0 and bool(converged.all()) and len(idx) == wanted_size):
                break
        beta.append(b)
        q = w / b
    vectors = None
    if return_vectors:
        m = len(alpha)
        vectors = basis[:m].T @ s[:, idx].to(basis.dtype)
    return LanczosResult(
        eigenvalues=theta[idx],
        residuals=residuals,
        converged=converged,
        iterations=len(alpha),
        alpha=torch.tensor(alpha, dtype=torch.float64),
        beta=torch.tensor(beta, dtype=torch.float64),
        eigenvectors=vectors,
    )
