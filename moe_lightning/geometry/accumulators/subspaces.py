"""Grassmann distances between the experts' subspaces (docs/geometry.md §5): functional (top right singular
vectors of the mean Jacobians) and representational (top eigenvectors of the input covariances)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from moe_lightning.geometry.accumulators.base import Accumulator
from moe_lightning.geometry.accumulators.mean_jacobian import (
    FactoredMeanJacobian,
    MeanJacobian,
    UnreadableWeights,
    warn_unreadable,
)
from moe_lightning.geometry.accumulators.pca import PCAMoments
from moe_lightning.geometry.accumulators.tokens import TokenCounts
from moe_lightning.geometry.alignment import offdiag_summary
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.subspaces import pairwise_grassmann, rank_gap, subspace_overlap_chance

__all__ = ["Subspaces"]

_GRASS = ("overlap", "geodesic", "projection")


class Subspaces(Accumulator):
    """Rank-``r`` subspaces of each expert and their pairwise Grassmann distances.

    It adds no statistics of its own: the bases come from the mean Jacobians and the input PCA. Not among the
    bootstrapped quantities (:data:`~moe_lightning.geometry.bootstrap.BOOTSTRAP_QUANTITIES`), it is skipped on
    the resamples.

    Args:
        tokens: the token counts.
        mean_jacobian: the mean Jacobians, formed or factored (None on the matrix-free path of experts without
            factors, or without Jacobians: no functional subspaces).
        pca: the PCA moments, with the ``"input"`` site.
        rank: ``r`` (capped at D).
        dim: D.
    """

    resampled = False

    def __init__(
        self,
        tokens: TokenCounts,
        mean_jacobian: MeanJacobian | FactoredMeanJacobian | None,
        pca: PCAMoments,
        rank: int,
        dim: int,
    ) -> None:
        self.tokens, self.mean_jacobian, self.pca, self.rank, self.dim = tokens, mean_jacobian, pca, rank, dim

    def _functional_bases(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> list:
        r, sum_w = self.rank, self.tokens.sum_w.of(buffer)
        bases, gaps = [], []
        factored = isinstance(self.mean_jacobian, FactoredMeanJacobian)
        for e in range(report.num_experts):
            if factored:  # the exact SVD of the mean Jacobian's small core (docs/geometry.md §1)
                found = None if bool(report.empty[e]) else done[self.mean_jacobian].singular(e, r)
            else:
                Jbar = self.mean_jacobian.sum_wJ.of(buffer)[e]
                found = None
                if not bool(report.empty[e]) and bool((Jbar != 0).any()):
                    _, S, Vh = torch.linalg.svd(Jbar / sum_w[e])
                    found = S, Vh
            if found is None:
                bases.append(None)
                gaps.append(math.nan)
            else:
                S, Vh = found
                # top-r right singular vectors, copied: a view would keep every expert's whole Vh alive until the
                # layer's subspaces are done (at Qwen3-30B-A3B's size 110 experts x 12.6 MB)
                bases.append(Vh[:r].T.clone())
                gaps.append(rank_gap(S, r))
        report.expert["subspace_fun_gap"] = torch.tensor(gaps, dtype=torch.float64)
        suffix = "_exact_factored" if factored else ""
        report.variants["subspace_fun"] = f"top{r}_right_singular_vectors_of_mean_jacobian{suffix}"
        return _determined(bases, gaps, report.name, "functional", r)

    def _representational_bases(self, pca_results: dict, report: GeometryReport) -> list[Tensor | None]:
        r = self.rank
        bases, gaps = [], []
        for res in pca_results.get("input", [None] * report.num_experts):
            ok = res is not None and res.total_weight > 0
            bases.append(res.eigenvectors[:, :r] if ok else None)
            gaps.append(rank_gap(res.eigenvalues, r) if ok else math.nan)
        report.expert["subspace_rep_gap"] = torch.tensor(gaps, dtype=torch.float64)
        report.variants["subspace_rep"] = f"top{r}_eigenvectors_of_input_covariance"
        report.variants["subspace_gap"] = "relative_gap_at_rank_r_(v_r-v_r+1)/v_r"
        return _determined(bases, gaps, report.name, "representational", r)

    def finalize(self, buffer: Tensor, report: GeometryReport, done: dict[Accumulator, Any]) -> None:
        bases: dict[str, list[Tensor | None]] = {}
        if self.mean_jacobian is not None:
            try:
                bases["fun"] = self._functional_bases(buffer, report, done)
            except UnreadableWeights as error:
                warn_unreadable(report.name, "the functional subspaces", error)
                report.variants["subspace_fun"] = "unavailable_weights_not_readable_at_finalize"
        bases["rep"] = self._representational_bases(done[self.pca], report)
        for kind, basis in bases.items():
            mats = pairwise_grassmann(basis)
            for q in _GRASS:
                M = mats[q]
                report.matrices[f"subspace_{kind}_{q}"] = M
                mean_off, max_off = offdiag_summary(M)
                report.layer[f"subspace_{kind}_{q}"] = mean_off
                if q == "overlap":
                    report.layer[f"subspace_{kind}_overlap_max"] = max_off
        report.layer["subspace_overlap_chance"] = subspace_overlap_chance(self.rank, self.dim)
        report.layer["subspace_rank"] = float(self.rank)
        report.variants["subspace_overlap"] = "mean_cos_sq_principal_angles"
        report.variants["subspace_overlap_chance"] = "r_over_d"


def _determined(bases: list[Tensor | None], gaps: list[float], layer: str, kind: str, r: int) -> list[Tensor | None]:
    """``bases`` without those of gap 0 (``v_r = 0``: fewer than ``r`` directions, so the rest of the basis is an
    arbitrary completion that round-off picks, and so is every distance from it), with one warning naming them."""
    undetermined = [e for e, gap in enumerate(gaps) if gap == 0.0]
    if undetermined:
        warnings.warn(
            f"probe of {layer!r}: the {kind} subspaces of experts {undetermined} are not determined at rank "
            f"r = {r} (fewer than r directions; their gap is 0): their Grassmann distances are NaN and left out "
            "of the layer's means",
            RuntimeWarning,
            stacklevel=3,
        )
    return [None if e in undetermined else basis for e, basis in enumerate(bases)]
