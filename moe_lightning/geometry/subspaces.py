"""Subspace geometry on the Grassmannian (docs/geometry.md §5).

Shape legend: ``D`` ambient dim, ``P``/``Q`` numbers of basis columns (subspace ranks, ``r`` in docs/geometry.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GrassmannDistance",
    "grassmann_distance",
    "orthonormal_basis",
    "pairwise_grassmann",
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


#: Most elements of the ``(pairs, D, r)`` residuals :func:`pairwise_grassmann` holds at once (64 MiB in float64).
_RESIDUAL_ELEMENTS = 2**23


def pairwise_grassmann(bases: Sequence[Tensor | None]) -> dict[str, Tensor]:
    """The :class:`GrassmannDistance` of every pair of ``E`` orthonormal bases, as ``(E, E)`` matrices.

    The values of :func:`grassmann_distance` (``orthonormal=True``) on each pair, to round-off, from one product of
    each basis with those after it and batched SVDs: the residual ``U_j − U_i U_iᵀ U_j`` is formed and decomposed
    only for the pairs that have an angle with ``cos² θ ≥ ½``, the only ones whose angles read it.

    Args:
        bases: ``E`` orthonormal ``(D, r)`` bases, or None for an expert without one (its row and column are NaN).

    Returns:
        ``{"geodesic", "projection", "overlap"}``, each ``(E, E)`` float64 and symmetric.

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> pairwise_grassmann([e[:, :2], e[:, 2:], None])["overlap"]
        tensor([[1., 0., nan],
                [0., 1., nan],
                [nan, nan, nan]], dtype=torch.float64)
    """
    num = len(bases)
    out = {q: torch.full((num, num), math.nan, dtype=torch.float64) for q in ("geodesic", "projection", "overlap")}
    live = [e for e, b in enumerate(bases) if b is not None]
    if not live:
        return out
    shapes = {tuple(bases[e].shape) for e in live}
    if len(shapes) > 1 or any(b.dim() != 2 or b.shape[1] == 0 for b in (bases[e] for e in live)):
        for a, i in enumerate(live):  # bases of different shapes: pair by pair
            for j in live[a:]:
                dist = grassmann_distance(bases[i], bases[j], orthonormal=True)
                for q, M in out.items():
                    M[i, j] = M[j, i] = getattr(dist, q)
        return out
    Q_EDR = torch.stack([bases[e] for e in live])
    d, r = Q_EDR.shape[1:]
    step = max(1, _RESIDUAL_ELEMENTS // (d * r))
    for a, i in enumerate(live):
        cross_PRR = Q_EDR[a].T @ Q_EDR[a:]  # (pairs, r, r): U_iᵀ U_j for j ≥ i
        cos = torch.linalg.svdvals(cross_PRR).clamp(-1.0, 1.0)  # descending cosines: ascending angles
        theta = torch.arccos(cos)
        near = (cos**2 >= 0.5).any(-1).nonzero().squeeze(-1)
        for start in range(0, near.numel(), step):
            p = near[start : start + step]
            residual = Q_EDR[a + p] - Q_EDR[a] @ cross_PRR[p]  # components of span(U_j) outside span(U_i)
            sin = torch.linalg.svdvals(residual).flip(-1).clamp(-1.0, 1.0)  # ascending sines
            theta[p] = torch.where(cos[p] ** 2 >= 0.5, torch.arcsin(sin), theta[p])
        values = {
            "geodesic": torch.linalg.vector_norm(theta, dim=-1),
            "projection": torch.linalg.vector_norm(torch.sin(theta), dim=-1),
            "overlap": (torch.cos(theta) ** 2).mean(-1),
        }
        cols = torch.tensor(live[a:])
        for q, M in out.items():
            M[i, cols] = M[cols, i] = values[q].to(device="cpu", dtype=torch.float64)
    return out


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
