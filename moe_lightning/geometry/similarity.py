"""Linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited", eq. 4 with a
linear kernel) between experts' outputs on shared tokens, from additive statistics (docs/geometry.md §4).

Shape legend: ``N`` tokens, ``E`` experts, ``D`` feature (output) dim.

With ``X, Y`` the ``(N, D)`` feature matrices centred over tokens,
``CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``. The centred cross-covariance is
``YᵀX = Σ_n y_n x_nᵀ − N ȳ x̄ᵀ``, so the uncentred cross products ``Σ f_i f_jᵀ``, the column sums ``Σ f_e`` and
``N`` are additive over tokens: chunks and ranks reduce exactly by summing them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cka_chance", "linear_cka", "linear_cka_from_sums", "linear_cka_sums"]


def linear_cka(x_ND: Tensor, y_ND: Tensor) -> float:
    """Linear CKA of two feature matrices on the same ``N`` tokens (any widths); NaN when either is constant."""
    xc = x_ND - x_ND.mean(0)
    yc = y_ND - y_ND.mean(0)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(num / den) if float(den) > 0 else math.nan


def linear_cka_sums(features_NED: Tensor) -> tuple[Tensor, Tensor]:
    """Additive statistics of linear CKA between every pair of ``E`` feature sets on the same tokens.

    Args:
        features_NED: ``(N, E, D)`` every expert's output at every token.

    Returns:
        ``(sum_ED, cross_EEDD)``: ``Σ_n f_e(x_n)`` and ``Σ_n f_i(x_n) f_j(x_n)ᵀ``; with the token count, sum them
        over chunks and ranks, then :func:`linear_cka_from_sums`.
    """
    return features_NED.sum(0), torch.einsum("nid,njk->ijdk", features_NED, features_NED)


def linear_cka_from_sums(count: float, sum_ED: Tensor, cross_EEDD: Tensor) -> Tensor:
    """The ``(E, E)`` linear CKA matrix from the summed statistics of :func:`linear_cka_sums` over ``count`` tokens.

    The ``1/N`` of the covariances cancels in the ratio, so the centred cross products
    ``C_ij = Σ f_i f_jᵀ − N f̄_i f̄_jᵀ`` are used as they are. NaN in the rows of a constant expert (``C_ii = 0``)
    and everywhere when ``count < 2``.
    """
    e = sum_ED.shape[0]
    if count < 2:
        return torch.full((e, e), math.nan, dtype=sum_ED.dtype, device=sum_ED.device)
    mean_ED = sum_ED / count
    centred_EEDD = cross_EEDD - count * torch.einsum("id,jk->ijdk", mean_ED, mean_ED)
    sq_EE = centred_EEDD.pow(2).sum((-1, -2))  # ‖C_ij‖²_F
    self_E = torch.diagonal(sq_EE).sqrt()  # ‖C_ii‖_F
    den_EE = self_E.unsqueeze(0) * self_E.unsqueeze(1)
    ok = den_EE > 0
    cka = sq_EE / torch.where(ok, den_EE, torch.ones_like(den_EE))
    return torch.where(ok, cka.clamp_max(1.0), torch.full_like(cka, math.nan))


def cka_chance(num_tokens: int, dim: int) -> float:
    """Chance level of linear CKA: ``D / (N + D)`` for two independent ``N × D`` i.i.d. Gaussian matrices.

    It is the ratio of expectations ``E‖YᵀX‖²_F / sqrt(E‖XᵀX‖²_F E‖YᵀY‖²_F)`` after centring (``n = N − 1``
    degrees of freedom, Wishart moments ``E‖XᵀY‖²_F = n D²`` and ``E‖XᵀX‖²_F = n D (n + D + 1)``), an approximation
    of ``E[CKA]`` that a fixed-seed Monte Carlo matches to a few percent at the probe's sizes (tests). It falls as
    ``D/N``: more tokens, lower chance.
    """
    if num_tokens < 2 or dim < 1:
        return math.nan
    return dim / (num_tokens + dim)
