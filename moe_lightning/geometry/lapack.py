"""Symmetric products and eigensolves of the wide cores (docs/geometry.md §1, "Factored experts at any width")
through the BLAS and LAPACK routines torch does not expose: the congruence ``U S Uᵀ`` by ``sygst`` with the
eigenvalues of ``syevd`` or the leading eigenpairs of ``syevr`` (:func:`congruence_eigvalsh`,
:func:`congruence_eigh`), and ``X Xᵀ`` by ``syrk`` (:func:`symmetric_gram`), through SciPy on CPU; torch's GEMMs and
eigensolvers elsewhere.

Shape legend: ``N`` tokens, ``K`` the order of the symmetric matrices, ``M`` rows of a Gram's factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.spectra import batched_eigvalsh

__all__ = ["congruence_eigh", "congruence_eigvalsh", "symmetric_gram"]


def congruence_eigvalsh(upper_KK: Tensor, sym_NKK: Tensor) -> Tensor:
    """Ascending eigenvalues of ``U S_n Uᵀ`` for an upper-triangular ``U`` and a batch of symmetric ``S_n``.

    On CPU in float32 or float64 LAPACK's ``sygst`` forms each ``U S_n Uᵀ`` from the triangles (``K³`` flops
    against the ``4K³`` of two GEMMs) and ``syevd`` takes its eigenvalues, one token after another on the BLAS
    threads of SciPy's LAPACK; elsewhere (another device or dtype, a ``U`` that is not square) the two GEMMs and
    :func:`batched_eigvalsh`. Only the lower triangle of each ``S_n`` is read (``torch.linalg.eigvalsh``'s default),
    and ``sym_NKK`` may be overwritten.

    Args:
        upper_KK: ``(K, K)`` upper-triangular ``U`` (an R factor of a QR: the diagonal may have either sign).
        sym_NKK: ``(N, K, K)`` symmetric ``S_n``.

    Returns:
        ``(N, K)`` ascending eigenvalues.

    Example:
        >>> U = torch.triu(torch.randn(4, 4, dtype=torch.float64))
        >>> X = torch.randn(2, 4, 6, dtype=torch.float64)
        >>> S = X @ X.mT
        >>> torch.allclose(congruence_eigvalsh(U, S.clone()), torch.linalg.eigvalsh(U @ S @ U.T))
        True
    """
    if not _lapack_congruence(upper_KK, sym_NKK) or sym_NKK.shape[0] == 0 or upper_KK.shape[0] == 0:
        return batched_eigvalsh(upper_KK @ sym_NKK @ upper_KK.mT)
    congruence, syevd = _lapack_congruence_of(upper_KK, "syevd")
    # SciPy's default workspace is LAPACK's minimum, with which the tridiagonal reduction runs unblocked (level-2
    # BLAS): the optimal one from LAPACK's workspace query makes the eigensolve about twice as fast at K = 768.
    lwork, liwork = _syevd_workspace(syevd, upper_KK.shape[0])
    out = sym_NKK.new_empty(sym_NKK.shape[:2])
    sym = sym_NKK.detach().contiguous()
    for n in range(sym.shape[0]):
        c = congruence(sym[n])
        w, _, info = syevd(c, compute_v=0, lower=0, lwork=lwork, liwork=liwork)
        # Not converged (a non-finite S_n, say): torch's eigensolver on that matrix decides, its values or its error.
        out[n] = torch.from_numpy(w) if info == 0 else torch.linalg.eigvalsh(torch.from_numpy(c), UPLO="U")
    return out


def congruence_eigh(upper_KK: Tensor, sym_KK: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` largest eigenvalues of ``U S Uᵀ`` (descending) and their eigenvectors, for an upper-triangular
    ``U`` and a symmetric ``S``: on CPU in float32 or float64 by LAPACK's ``sygst`` and ``syevr`` (only the
    eigenpairs asked for), elsewhere by the two GEMMs and ``torch.linalg.eigh``. Reads the lower triangle of ``S``,
    which may be overwritten.

    Args:
        upper_KK: ``(K, K)`` upper-triangular ``U``.
        sym_KK: ``(K, K)`` symmetric ``S``.
        top: how many eigenpairs (at most ``K``).

    Returns:
        ``(top,)`` descending eigenvalues and ``(K, top)`` eigenvectors as columns.

    Example:
        >>> U = torch.triu(torch.randn(5, 5, dtype=torch.float64))
        >>> X = torch.randn(5, 7, dtype=torch.float64)
        >>> w, _ = congruence_eigh(U, X @ X.T, 2)
        >>> torch.allclose(w, torch.linalg.eigvalsh(U @ X @ X.T @ U.T).flip(0)[:2])
        True
    """
    k = upper_KK.shape[0]
    if not 1 <= top <= k:
        raise ValueError(f"congruence_eigh: top must be in [1, {k}], got {top!r}")
    if not _lapack_congruence(upper_KK, sym_KK.unsqueeze(0)):
        w, v = torch.linalg.eigh(upper_KK @ sym_KK @ upper_KK.mT)
        return w[-top:].flip(0), v[:, -top:].flip(1)
    congruence, syevr = _lapack_congruence_of(upper_KK, "syevr")
    c = congruence(sym_KK.detach().contiguous())
    w, z, _, _, info = syevr(c, compute_v=1, range="I", il=k - top + 1, iu=k, lower=0)
    if info != 0:  # not converged: torch's eigensolver on that matrix decides, its values or its error
        w_all, z_all = torch.linalg.eigh(torch.from_numpy(c), UPLO="U")
        return w_all[-top:].flip(0), z_all[:, -top:].flip(1)
    return torch.from_numpy(w[:top].copy()).flip(0), torch.from_numpy(z[:, :top].copy()).flip(1)


def symmetric_gram(X_MK: Tensor) -> Tensor:
    """``X Xᵀ``, exactly symmetric: on CPU in float32 or float64 BLAS's ``syrk`` through SciPy (one triangle, half
    a GEMM's flops; torch has no symmetric product), elsewhere ``X @ Xᵀ``.

    Args:
        X_MK: ``(M, K)``.

    Returns:
        ``(M, M)``.

    Example:
        >>> X = torch.randn(3, 5, dtype=torch.float64)
        >>> torch.allclose(symmetric_gram(X), X @ X.T)
        True
    """
    if (
        X_MK.dim() != 2
        or X_MK.device.type != "cpu"
        or X_MK.dtype not in (torch.float32, torch.float64)
        or (torch.is_grad_enabled() and X_MK.requires_grad)
        or 0 in X_MK.shape
    ):
        return X_MK @ X_MK.mT
    from scipy.linalg import blas as scipy_blas

    X = X_MK.detach()
    if X.mT.is_contiguous():  # a transposed C-ordered matrix is X in Fortran order: syrk's A Aᵀ
        a, trans = X.mT.numpy().T, 0
    else:  # Fortran-ordered Xᵀ: syrk's Aᵀ A
        a, trans = X.contiguous().numpy().T, 1
    (syrk,) = scipy_blas.get_blas_funcs(("syrk",), (a,))
    upper = torch.from_numpy(syrk(1.0, a, trans=trans, lower=0)).triu()
    return upper + upper.triu(1).mT


def _lapack_congruence_of(upper_KK: Tensor, eigensolver: str) -> tuple[Callable[[Tensor], Any], Callable]:
    """``S -> U S Uᵀ`` by SciPy's LAPACK ``sygst`` (the result in the upper triangle of a Fortran-ordered array, ``S``
    overwritten), and the LAPACK ``eigensolver`` of ``U``'s dtype."""
    from scipy.linalg import lapack as scipy_lapack  # scipy's import costs a second; only wide cores need it

    u = upper_KK.detach().numpy(force=True).copy(order="F")
    sygst, solver = scipy_lapack.get_lapack_funcs(("sygst", eigensolver), (u,))

    def congruence(sym_KK: Tensor) -> Any:
        # The transpose of a C-ordered S is the Fortran-ordered Sᵀ, whose upper triangle is S's lower one.
        c, info = sygst(sym_KK.numpy().T, u, itype=2, lower=0, overwrite_a=1)
        if info != 0:  # an illegal argument: not the data's doing
            raise RuntimeError(f"LAPACK {sygst.typecode}sygst failed with info={info}")
        return c

    return congruence, solver


def _syevd_workspace(syevd: Callable, k: int) -> tuple[int, int]:
    """LAPACK's optimal ``(lwork, liwork)`` for the values-only ``syevd`` of a ``k × k`` matrix (its workspace
    query, through SciPy's ``syevd_lwork``)."""
    from scipy.linalg import lapack as scipy_lapack

    query = getattr(scipy_lapack, f"{syevd.typecode}syevd_lwork")
    lwork, liwork, info = query(k, compute_v=0, lower=0)
    if info != 0:
        raise RuntimeError(f"LAPACK {syevd.typecode}syevd workspace query failed with info={info}")
    return int(lwork), int(liwork)


def _lapack_congruence(upper_KK: Tensor, sym_NKK: Tensor) -> bool:
    """Whether :func:`congruence_eigvalsh` and :func:`congruence_eigh` can hand these to SciPy's LAPACK: CPU, float32
    or float64, a square ``U``, and nothing that autograd should follow."""
    k = upper_KK.shape[0]
    return (
        upper_KK.device.type == "cpu"
        and sym_NKK.device.type == "cpu"
        and upper_KK.dtype in (torch.float32, torch.float64)
        and sym_NKK.dtype == upper_KK.dtype
        and upper_KK.shape == (k, k)
        and sym_NKK.shape[1:] == (k, k)
        and not (torch.is_grad_enabled() and (upper_KK.requires_grad or sym_NKK.requires_grad))
    )
