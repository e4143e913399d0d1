"""Weighted PCA of routed hidden states (docs/geometry.md §3).

Shape legend: ``N`` tokens, ``D`` feature dim of the site (model dim for input/output, ``H`` for the hidden site).

Two paths give the same values (docs/geometry.md §3):

- **moments**: the additive ``Σw``, ``Σw²``, ``Σw x`` and ``Σw x xᵀ`` (plus the token count), so batches and DDP
  ranks combine exactly by summation (:class:`~moe_lightning.geometry.covariance.WeightedCovariance` syncs them with
  ``dist_reduce_fx="sum"``); ``D²`` numbers whatever the token count;
- **tokens** (:func:`pca_from_tokens`): the weighted tokens themselves, gathered; with ``N < D`` the covariance's
  nonzero eigenvalues are those of the ``N × N`` Gram matrix of the centred weighted tokens, and its eigenvectors
  follow from the Gram eigenvectors, so memory scales with ``N·D``, not ``D²``.

The covariance divides by ``Σw`` (docs/geometry.md §3), i.e. it is numpy's ``np.cov(x.T, aweights=w, bias=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.geometry.spectra import effective_rank, n_components_for_variance, participation_ratio

__all__ = [
    "PCAResult",
    "moments",
    "pca_from_moments",
    "pca_from_tokens",
    "pca_ranks",
    "pca_ranks_from_tokens",
    "weighted_pca",
]


@dataclass
class PCAResult:
    """Weighted PCA of one site (docs/geometry.md §3).

    Attributes:
        eigenvalues: ``(D,)`` covariance eigenvalues, descending; values within round-off of the raw second
            moments (``D · eps · max diag(Σw x xᵀ)/Σw``) are set to 0. NaN when there is no weight.
        eigenvectors: ``(D, D)`` matching unit eigenvectors as columns; from :func:`pca_from_tokens` with
            ``N < D`` tokens, the leading ``(D, K)`` of them, ``K = min(D, max(N, min_vectors))`` (the directions
            beyond the tokens' span have eigenvalue 0 and no preferred basis on either path).
        mean: ``(D,)`` weighted mean ``μ = Σw x / Σw``.
        total_weight: ``Σw``.
        num_tokens: number of tokens with ``w > 0``.
        n_eff: effective sample size ``(Σw)² / Σw²``.
        effective_rank: ``exp(H(λ / Σλ))`` (Roy & Vetterli, 2007).
        participation_ratio: ``(Σλ)² / Σλ²``.
        n90: components needed for 90% of the variance.
        undersampled: ``n_eff < D``: the estimate is reported but flagged (docs/geometry.md §3).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    mean: Tensor
    total_weight: float
    num_tokens: int
    n_eff: float
    effective_rank: float
    participation_ratio: float
    n90: float
    undersampled: bool


def pca_from_moments(sum_w: Tensor, sum_w2: Tensor, sum_wx: Tensor, sum_wxx: Tensor, count: Tensor) -> PCAResult:
    """Weighted PCA from accumulated moments.

    ``C = Σw x xᵀ / Σw − μ μᵀ`` equals ``Σ w (x − μ)(x − μ)ᵀ / Σw`` exactly in exact arithmetic; it is
    symmetrised and diagonalised with ``eigh``. With ``Σw = 0`` every value is NaN (an empty expert).

    Args:
        sum_w: scalar ``Σw``.
        sum_w2: scalar ``Σw²``.
        sum_wx: ``(D,)`` ``Σ w x``.
        sum_wxx: ``(D, D)`` ``Σ w x xᵀ``.
        count: scalar number of tokens with ``w > 0``.
    """
    d = sum_wx.shape[-1]
    total = float(sum_w)
    n_tok = int(round(float(count)))
    nan = float("nan")
    if not total > 0:
        nan_v = torch.full((d,), nan, dtype=sum_wx.dtype, device=sum_wx.device)
        nan_m = torch.full((d, d), nan, dtype=sum_wx.dtype, device=sum_wx.device)
        return PCAResult(nan_v, nan_m, nan_v.clone(), 0.0, n_tok, 0.0, nan, nan, nan, True)
    mean = sum_wx / sum_w
    cov = sum_wxx / sum_w - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    # E[x xᵀ] − μμᵀ cancels: eigenvalues below the round-off level of the raw second moments are zero
    # (e.g. one token, or a site confined to a subspace), not tiny variances that would inflate effective rank.
    noise = float(_noise_floor(d, cov.dtype, torch.diagonal(sum_wxx).abs().max(), sum_w))
    evals = torch.where(evals.abs() <= noise, torch.zeros_like(evals), evals)
    lam = evals.clamp_min(0)
    n_eff = total**2 / float(sum_w2)
    return PCAResult(
        eigenvalues=evals,
        eigenvectors=evecs,
        mean=mean,
        total_weight=total,
        num_tokens=n_tok,
        n_eff=n_eff,
        effective_rank=float(effective_rank(lam)),
        participation_ratio=float(participation_ratio(lam)),
        n90=float(n_components_for_variance(lam, 0.9)),
        undersampled=n_eff < d,
    )


def _rank_measures(evals: Tensor, noise: Tensor, sum_w: Tensor, sum_w2: Tensor, d: int) -> dict[str, Tensor]:
    """The rank measures of :func:`pca_ranks` from descending eigenvalues ``(..., K)`` of the weighted covariance
    (``K ≤ D``), eigenvalues within the round-off floor ``noise`` ``(...)`` counted as 0; NaN where ``Σw = 0``."""
    ok = sum_w > 0
    lam = torch.where(evals.abs() <= noise.unsqueeze(-1), torch.zeros_like(evals), evals).clamp_min(0)
    nan = torch.full_like(sum_w, float("nan"))
    n_eff = torch.where(ok, sum_w**2 / torch.where(ok, sum_w2, torch.ones_like(sum_w2)), torch.zeros_like(sum_w))
    return {
        "effective_rank": torch.where(ok, effective_rank(lam), nan),
        "participation_ratio": torch.where(ok, participation_ratio(lam), nan),
        "n90": torch.where(ok, n_components_for_variance(lam, 0.9), nan),
        "n_eff": n_eff,
        "undersampled": (n_eff < d).to(sum_w.dtype),
    }


def pca_ranks(sum_w: Tensor, sum_w2: Tensor, sum_wx: Tensor, sum_wxx: Tensor) -> dict[str, Tensor]:
    """The rank measures of :func:`pca_from_moments` for many sets of moments at once (leading dims ``...``), from
    the eigenvalues alone (``eigvalsh``): what the bootstrap needs on each resample.

    Args:
        sum_w: ``(...)`` ``Σw``.
        sum_w2: ``(...)`` ``Σw²``.
        sum_wx: ``(..., D)`` ``Σ w x``.
        sum_wxx: ``(..., D, D)`` ``Σ w x xᵀ``.

    Returns:
        ``effective_rank``, ``participation_ratio``, ``n90`` (NaN where ``Σw = 0``), ``n_eff`` (0 there) and
        ``undersampled`` (1.0 where ``n_eff < D``), each ``(...)``, as :func:`pca_from_moments` computes them.
    """
    d = sum_wx.shape[-1]
    ok = sum_w > 0
    safe_w = torch.where(ok, sum_w, torch.ones_like(sum_w))
    mean = sum_wx / safe_w.unsqueeze(-1)
    cov = sum_wxx / safe_w[..., None, None] - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    evals = torch.linalg.eigvalsh(0.5 * (cov + cov.mT)).flip(-1)
    # the same round-off floor as pca_from_moments
    noise = _noise_floor(d, cov.dtype, torch.diagonal(sum_wxx, dim1=-2, dim2=-1).abs().amax(-1), safe_w)
    return _rank_measures(evals, noise, sum_w, sum_w2, d)


def _noise_floor(d: int, dtype: torch.dtype, max_diag_sum_wxx: Tensor, sum_w: Tensor) -> Tensor:
    """The round-off level of ``Σw x xᵀ / Σw − μμᵀ`` below which :func:`pca_from_moments` sets an eigenvalue to 0;
    the token path applies the same floor, so both paths report the same zeros."""
    return d * torch.finfo(dtype).eps * max_diag_sum_wxx.abs() / sum_w


def pca_from_tokens(z_ND: Tensor, w_N: Tensor, *, min_vectors: int = 0) -> PCAResult:
    """:func:`pca_from_moments` of the moments of ``(z, w)``, computed in ``O(N·D + N²)`` memory when ``N < D``.

    With ``Y = diag(√(w/Σw)) (Z − 1μᵀ)`` the covariance is ``C = YᵀY``; its nonzero eigenvalues are those of the
    ``N × N`` Gram matrix ``G = Y Yᵀ``, and ``G u = λ u`` gives the unit eigenvector ``Yᵀu/√λ`` of ``C``. The same
    round-off floor as the moments path zeroes eigenvalues, and the ``D − N`` eigenvalues outside the tokens' span
    are exactly 0. With ``N ≥ D`` the ``D × D`` moments are no larger than the tokens, and they are used.

    Args:
        z_ND: ``(N, D)`` the tokens of one expert at one site.
        w_N: ``(N,)`` their positive weights.
        min_vectors: the fewest eigenvector columns to return (a subspace rank): past the positive eigenvalues the
            columns are an orthonormal completion, as arbitrary as the exact path's eigenvectors of eigenvalue 0.

    Returns:
        A :class:`PCAResult`, equal to ``pca_from_moments(*moments(z_ND, w_N))`` up to round-off, with ``K``
        eigenvector columns (see :class:`PCAResult`).
    """
    n, d = z_ND.shape
    if n >= d:
        return pca_from_moments(*moments(z_ND, w_N))
    sum_w = w_N.sum()
    total = float(sum_w)
    nan = float("nan")
    if not total > 0:
        nan_v = torch.full((d,), nan, dtype=z_ND.dtype, device=z_ND.device)
        return PCAResult(nan_v, nan_v[:, None][:, :0], nan_v.clone(), 0.0, 0, 0.0, nan, nan, nan, True)
    mean = (w_N @ z_ND) / sum_w
    y_ND = (z_ND - mean) * (w_N / sum_w).sqrt().unsqueeze(-1)
    gram = y_ND @ y_ND.T
    lam, u_NN = torch.linalg.eigh(0.5 * (gram + gram.T))
    lam, u_NN = lam.flip(-1), u_NN.flip(-1)
    noise = _noise_floor(d, z_ND.dtype, (w_N @ (z_ND * z_ND)).max(), sum_w)
    lam = torch.where(lam.abs() <= noise, torch.zeros_like(lam), lam)
    positive = lam > 0
    vectors_DK = (y_ND.T @ u_NN[:, positive]) / lam[positive].sqrt()
    wanted = min(d, max(n, min_vectors))
    if vectors_DK.shape[1] < wanted:  # complete to an orthonormal set: zero-variance directions
        eye = torch.eye(d, wanted, dtype=z_ND.dtype, device=z_ND.device)
        q_DK, _ = torch.linalg.qr(torch.cat([vectors_DK, eye], dim=1))
        vectors_DK = torch.cat([vectors_DK, q_DK[:, vectors_DK.shape[1] : wanted]], dim=1)
    evals = torch.cat([lam, torch.zeros(d - n, dtype=lam.dtype, device=lam.device)]).sort(descending=True).values
    clamped = evals.clamp_min(0)
    n_eff = total**2 / float((w_N * w_N).sum())
    return PCAResult(
        eigenvalues=evals,
        eigenvectors=vectors_DK,
        mean=mean,
        total_weight=total,
        num_tokens=int((w_N > 0).sum()),
        n_eff=n_eff,
        effective_rank=float(effective_rank(clamped)),
        participation_ratio=float(participation_ratio(clamped)),
        n90=float(n_components_for_variance(clamped, 0.9)),
        undersampled=n_eff < d,
    )


def pca_ranks_from_tokens(z_ND: Tensor, w_BN: Tensor, memory_budget_bytes: int) -> dict[str, Tensor]:
    """:func:`pca_ranks` for ``B`` weightings of the same tokens (the bootstrap resamples of one expert's tokens:
    ``w_BN = counts · w``), each equal to ``pca_ranks`` of that weighting's moments up to round-off.

    With ``N < D`` the eigenvalues come from ``B`` Gram matrices ``N × N``, centred from the one kernel ``K = Z Zᵀ``
    (``(Z − 1μᵀ)(Z − 1μᵀ)ᵀ = K − a1ᵀ − 1aᵀ + μᵀμ`` with ``a = Zμ``); with ``N ≥ D`` from ``D × D`` moments, as many
    resamples at a time as ``memory_budget_bytes`` holds.

    Args:
        z_ND: ``(N, D)`` tokens.
        w_BN: ``(B, N)`` nonnegative weights per resample.
        memory_budget_bytes: bounds the ``(b, D, D)`` moments of one block of resamples on the ``N ≥ D`` path.

    Returns:
        What :func:`pca_ranks` returns, each ``(B,)``.
    """
    n, d = z_ND.shape
    sum_w, sum_w2 = w_BN.sum(-1), (w_BN * w_BN).sum(-1)
    if n >= d:
        per_resample = max(1, memory_budget_bytes // (3 * d * d * z_ND.element_size()))
        parts = [
            pca_ranks(
                sum_w[b : b + per_resample],
                sum_w2[b : b + per_resample],
                *_weighted_moments(z_ND, w_BN[b : b + per_resample]),
            )
            for b in range(0, w_BN.shape[0], per_resample)
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    ok = sum_w > 0
    safe_w = torch.where(ok, sum_w, torch.ones_like(sum_w))
    p_BN = w_BN / safe_w.unsqueeze(-1)
    kernel_NN = z_ND @ z_ND.T
    a_BN = p_BN @ kernel_NN  # (Z μ_b)ᵀ
    mu_sq_B = (a_BN * p_BN).sum(-1)  # μ_bᵀ μ_b
    centred_BNN = kernel_NN - a_BN.unsqueeze(-1) - a_BN.unsqueeze(-2) + mu_sq_B[:, None, None]
    s_BN = p_BN.sqrt()
    gram_BNN = s_BN.unsqueeze(-1) * centred_BNN * s_BN.unsqueeze(-2)
    evals = torch.linalg.eigvalsh(0.5 * (gram_BNN + gram_BNN.mT)).flip(-1)
    noise = _noise_floor(d, z_ND.dtype, (w_BN @ (z_ND * z_ND)).amax(-1), safe_w)
    return _rank_measures(evals, noise, sum_w, sum_w2, d)


def _weighted_moments(z_ND: Tensor, w_BN: Tensor) -> tuple[Tensor, Tensor]:
    """``Σw z`` and ``Σw z zᵀ`` for each of ``B`` weightings: ``(B, D)`` and ``(B, D, D)``."""
    return w_BN @ z_ND, torch.einsum("bn,ni,nj->bij", w_BN, z_ND, z_ND)


def moments(x_ND: Tensor, w_N: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``Σw``, ``Σw²``, ``Σw x``, ``Σw x xᵀ`` and the count of positive weights: the additive moments of
    docs/geometry.md §3, which :func:`pca_from_moments` turns into a :class:`PCAResult`."""
    xw_ND = x_ND * w_N.unsqueeze(-1)
    return w_N.sum(), (w_N * w_N).sum(), xw_ND.sum(0), xw_ND.T @ x_ND, (w_N > 0).sum().to(x_ND.dtype)


def weighted_pca(x_ND: Tensor, w_N: Tensor | None = None) -> PCAResult:
    """Weighted PCA of ``x`` with token weights ``w`` (docs/geometry.md §3; weights are gate values ``g_e(x)``).

    Args:
        x_ND: ``(N, D)`` states.
        w_N: ``(N,)`` nonnegative weights; None means all ones.

    Returns:
        A :class:`PCAResult`.

    Example:
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> res = weighted_pca(x)
        >>> torch.allclose(res.eigenvalues.sum(), x.var(0, unbiased=False).sum())
        True
    """
    if x_ND.dim() != 2:
        raise ValueError(f"weighted_pca: x_ND must be 2-D (N, D), got shape {tuple(x_ND.shape)}")
    if w_N is None:
        w_N = torch.ones(x_ND.shape[0], dtype=x_ND.dtype, device=x_ND.device)
    if w_N.shape != x_ND.shape[:1]:
        raise ValueError(f"weighted_pca: w_N must have shape ({x_ND.shape[0]},), got {tuple(w_N.shape)}")
    if bool((w_N < 0).any()):
        raise ValueError("weighted_pca: weights w_N must be nonnegative")
    return pca_from_moments(*moments(x_ND, w_N.to(x_ND.dtype)))
