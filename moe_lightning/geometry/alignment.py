"""Cross-expert Jacobian alignment (docs/geometry.md §4).

Shape legend: ``N`` tokens, ``E`` experts, ``O``/``I`` Jacobian output/input dims (both ``D`` for an expert).

Cosines are Frobenius cosines ``|⟨A, B⟩_F| / (‖A‖_F ‖B‖_F)``; a zero matrix has no direction, so any cosine
that involves one is NaN and left out of means (docs/geometry.md §4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "alignment_chance",
    "jacobian_alignment",
    "offdiag_summary",
    "pointwise_cosine_sums",
    "sampled_pairs",
    "sampled_pairs_summary",
]


def _abs_cosines(flat_BEK: Tensor) -> Tensor:
    """``(..., E, K)`` flattened matrices -> ``(..., E, E)`` absolute cosines, NaN where a norm is zero."""
    norms = torch.linalg.vector_norm(flat_BEK, dim=-1)  # (..., E)
    gram = flat_BEK @ flat_BEK.transpose(-1, -2)
    denom = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    ok = denom > 0
    cos = gram.abs() / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, cos.clamp_max(1.0), torch.full_like(cos, math.nan))


def jacobian_alignment(jacobians_EOI: Tensor) -> Tensor:
    """Mean-Jacobian alignment matrix ``A_ij = |⟨J̄_i, J̄_j⟩_F| / (‖J̄_i‖_F ‖J̄_j‖_F)`` (docs/geometry.md §4).

    Args:
        jacobians_EOI: ``(E, O, I)`` one matrix per expert, typically the ``w_e``-weighted mean Jacobians
            ``J̄_e`` (any positive scaling of a row gives the same result, so ``Σ w J`` works as well).

    Returns:
        ``(E, E)`` symmetric matrix in ``[0, 1]``; NaN in the rows/columns of zero matrices.

    Example:
        >>> J = torch.stack([torch.eye(2), -torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]).double()
        >>> jacobian_alignment(J)
        tensor([[1., 1., 0.],
                [1., 1., 0.],
                [0., 0., 1.]], dtype=torch.float64)
    """
    return _abs_cosines(jacobians_EOI.reshape(jacobians_EOI.shape[0], -1))


def pointwise_cosine_sums(jacobians_NEOI: Tensor) -> tuple[Tensor, Tensor]:
    """Additive statistics of pointwise alignment ``P_ij`` (docs/geometry.md §4) on shared inputs.

    Args:
        jacobians_NEOI: ``(N, E, O, I)`` every expert's Jacobian at every token.

    Returns:
        ``(sum_cos_EE, count_EE)``: the sum over tokens of ``|cos(J_i(x), J_j(x))|`` and the number of tokens where
        it is defined (both norms nonzero). ``P = sum_cos / count`` after summing over chunks and ranks.
    """
    n, e = jacobians_NEOI.shape[:2]
    cos_NEE = _abs_cosines(jacobians_NEOI.reshape(n, e, -1))
    ok = torch.isfinite(cos_NEE)
    return torch.where(ok, cos_NEE, torch.zeros_like(cos_NEE)).sum(0), ok.sum(0).to(cos_NEE.dtype)


def alignment_chance(d_out: int, d_in: int | None = None) -> float:
    """Chance level ``E|cos|`` of two independent Gaussian ``d_out × d_in`` matrices (docs/geometry.md §4).

    Exact value for ``n = d_out · d_in`` i.i.d. coordinates: ``Γ(n/2) / (√π Γ((n+1)/2))``, which is
    ``sqrt(2/π)/d · (1 + O(1/d²))`` for square ``d × d`` (its large-``d`` form).

    Args:
        d_out: rows.
        d_in: columns (defaults to ``d_out``).
    """
    d_in = d_out if d_in is None else d_in
    if d_out < 1 or d_in < 1:
        raise ValueError(f"alignment_chance: dims must be >= 1, got d_out={d_out!r}, d_in={d_in!r}")
    n = d_out * d_in
    if n == 1:
        return 1.0
    return math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)


def offdiag_summary(matrix_EE: Tensor) -> tuple[float, float]:
    """Mean and max of the finite off-diagonal entries of a square matrix; NaN when there are none (E = 1)."""
    e = matrix_EE.shape[0]
    off = matrix_EE[~torch.eye(e, dtype=torch.bool, device=matrix_EE.device)]
    off = off[torch.isfinite(off)]
    if off.numel() == 0:
        return math.nan, math.nan
    return float(off.mean()), float(off.max())


def sampled_pairs(num_experts: int, pairs: int | None, seed: int) -> Tensor | None:
    """``(E, E)`` symmetric mask of ``pairs`` pairs of experts drawn uniformly without replacement from a local
    generator seeded by ``seed`` (the same on every rank), the diagonal set; None when ``pairs`` is None or at least
    the ``E (E − 1) / 2`` pairs there are (every pair is computed)."""
    total = num_experts * (num_experts - 1) // 2
    if pairs is None or pairs >= total:
        return None
    i, j = torch.triu_indices(num_experts, num_experts, offset=1)
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:pairs]
    mask = torch.eye(num_experts, dtype=torch.bool)
    mask[i[pick], j[pick]] = mask[j[pick], i[pick]] = True
    return mask


def sampled_pairs_summary(matrix_EE: Tensor, mask_EE: Tensor) -> tuple[float, float]:
    """The mean of the finite off-diagonal entries of the sampled pairs of ``mask_EE`` and its standard error as
    an estimate of the mean over every pair: ``(s² / m · (1 − m / P))^½`` for ``m`` sampled of ``P`` pairs (a
    simple random sample without replacement, with the finite-population correction). NaN with fewer than 2."""
    e = matrix_EE.shape[0]
    upper = torch.triu(mask_EE.to(matrix_EE.device), diagonal=1)
    values = matrix_EE[upper]
    values = values[torch.isfinite(values)]
    m, total = values.numel(), e * (e - 1) // 2
    if m < 2:
        return math.nan, math.nan
    return float(values.mean()), float((values.var(correction=1) / m * (1 - m / total)).sqrt())
