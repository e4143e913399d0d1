"""Subspace geometry on the Grassmannian (docs/geometry.md §5).

Shape legend: ``D`` ambient dim, ``P``/``Q`` numbers of basis columns (subspace ranks, ``r`` in docs/geometry.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GrassmannDistance",
    "grassmann_distance",
    "orthonormal_basis",
    "principal_angles",
    "rank_gap",
    "subspace_overlap_chance",
]


def orthonormal_basis(A_DP: Tensor, rcond: float | None = None) -> Tensor:
    """Orthonormal basis of the column space of ``A`` by SVD, dropping directions below ``rcond · s_max``.

    Same rule as ``scipy.linalg.orth`` (``rcond = eps · max(D, P)``), so rank-deficient inputs give a smaller basis.
    """
    U, s, _ = torch.linalg.svd(A_DP, full_matrices=False)
    if rcond is None:
        rcond = torch.finfo(A_DP.dtype).eps * max(A_DP.shape)
    rank = int((s > (s.max() if s.numel() else 0) * rcond).sum()) if s.numel() else 0
    return U[:, :rank]


def principal_angles(A_DP: Tensor, B_DQ: Tensor, *, orthonormal: bool = False) -> Tensor:
    """Principal angles between the column spaces of ``A`` and ``B``, ascending (docs/geometry.md §5).

    ``θ_k = arccos s_k`` with ``s`` the singular values of ``U_Aᵀ U_B`` (Björck & Golub, 1973). ``arccos`` loses
    accuracy for small angles (``~1e-8`` rad at best in float64), so angles with ``cos² θ ≥ ½`` are taken from
    ``arcsin`` of the singular values of the residual ``U_B − U_A U_Aᵀ U_B`` (Knyazev & Argentati, 2002), as
    ``scipy.linalg.subspace_angles`` does; here each angle uses the formula accurate for it.

    Args:
        A_DP: ``(D, P)`` spanning columns.
        B_DQ: ``(D, Q)`` spanning columns.
        orthonormal: skip orthonormalisation when the columns already are orthonormal.

    Returns:
        ``(min(P', Q'),)`` angles in radians, ascending, where ``P'``/``Q'`` are the numerical ranks.

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> principal_angles(e[:, :2], e[:, 1:])
        tensor([0.0000, 1.5708], dtype=torch.float64)
    """
    if A_DP.dim() != 2 or B_DQ.dim() != 2 or A_DP.shape[0] != B_DQ.shape[0]:
        raise ValueError(
            f"principal_angles: A and B must be 2-D with the same number of rows, got {tuple(A_DP.shape)} "
            f"and {tuple(B_DQ.shape)}"
        )
    QA = A_DP if orthonormal else orthonormal_basis(A_DP)
    QB = B_DQ if orthonormal else orthonormal_basis(B_DQ)
    if QA.shape[1] < QB.shape[1]:
        QA, QB = QB, QA
    cross = QA.T @ QB  # (P, Q) with P >= Q
    cos = torch.linalg.svdvals(cross).clamp(-1.0, 1.0)  # descending cosines: ascending angles
    residual = QB - QA @ cross  # component of span(B) outside span(A)
    sin = torch.linalg.svdvals(residual).flip(-1).clamp(-1.0, 1.0)  # ascending sines: ascending angles
    small = cos**2 >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


@dataclass
class GrassmannDistance:
    """Distances between two subspaces of equal rank (docs/geometry.md §5).

    Attributes:
        geodesic: ``‖θ‖_2`` (arc-length distance on the Grassmannian).
        projection: ``‖sin θ‖_2`` (``‖P_A − P_B‖_F / √2``).
        overlap: ``mean_k cos² θ_k`` in ``[0, 1]``; its chance value is ``r/d``.
        angles: the principal angles, ascending.
    """

    geodesic: float
    projection: float
    overlap: float
    angles: Tensor


def grassmann_distance(A_DP: Tensor, B_DQ: Tensor, *, orthonormal: bool = False) -> GrassmannDistance:
    """Geodesic, projection distance and overlap between ``span(A)`` and ``span(B)`` (docs/geometry.md §5).

    Args:
        A_DP: ``(D, P)`` spanning columns.
        B_DQ: ``(D, Q)`` spanning columns.
        orthonormal: the columns already are orthonormal.

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> grassmann_distance(e[:, :2], e[:, :2]).overlap
        1.0
    """
    theta = principal_angles(A_DP, B_DQ, orthonormal=orthonormal)
    if theta.numel() == 0:
        nan = float("nan")
        return GrassmannDistance(nan, nan, nan, theta)
    return GrassmannDistance(
        geodesic=float(torch.linalg.vector_norm(theta)),
        projection=float(torch.linalg.vector_norm(torch.sin(theta))),
        overlap=float((torch.cos(theta) ** 2).mean()),
        angles=theta,
    )


def subspace_overlap_chance(r: int, d: int) -> float:
    """Expected overlap ``mean_k cos² θ_k`` of two independent uniformly random ``r``-dim subspaces of ``R^d``.

    ``E‖U_Aᵀ U_B‖_F² = r²/d``, so the mean of the ``r`` squared cosines is ``r/d`` (docs/geometry.md §5).
    """
    if not 1 <= r <= d:
        raise ValueError(f"subspace_overlap_chance: need 1 <= r <= d, got r={r!r}, d={d!r}")
    return r / d


def rank_gap(values: Tensor, r: int) -> float:
    """Relative gap ``(v_r − v_{r+1}) / v_r`` at rank ``r`` of a descending spectrum: how well the top-``r``
    subspace is determined (a project addition to the papers' quantities, docs/geometry.md §5).

    By Davis–Kahan (eigenvectors of a covariance) and Wedin (singular vectors of a mean Jacobian), a perturbation
    ``E`` of the matrix moves its top-``r`` subspace by at most about ``‖E‖ / (v_r − v_{r+1})``, so a gap near 0
    means the subspace, and every overlap computed from it, can swing with sampling noise or round-off. 1 when
    ``r`` is the whole space or ``v_{r+1} = 0 < v_r``; 0 when ``v_r = 0`` (fewer than ``r`` directions carry any
    variance); NaN for a non-finite spectrum.
    """
    v = values.detach().to(torch.float64)
    if v.numel() <= r:
        return 1.0
    vr, vnext = float(v[r - 1]), float(v[r])
    if not (math.isfinite(vr) and math.isfinite(vnext)):
        return math.nan
    return (vr - vnext) / vr if vr > 0 else 0.0
