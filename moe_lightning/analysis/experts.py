"""Per-layer numbers of probed models: one row per layer of a probe's reports, and the expert means (weighted by
each expert's gate mass Σw) of a layer's Jacobian spectrum and PCA eigenvalues, which the probe page, the training
report's figures and the run dashboard draw.

Shapes: ``E`` experts, ``M`` singular values (or eigenvalues) of a spectrum.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from moe_lightning.analysis.steps import GEOMETRY_METRICS


def weighted_expert_mean(values_EM: np.ndarray, weights_E: np.ndarray | None = None) -> np.ndarray:
    """Average of per-expert vectors ``(E, M)`` over experts, weighted by ``weights_E`` (Σ gate weight).

    Experts with a non-finite row (no routed tokens) or zero weight are left out; all-NaN when none is left.
    """
    values_EM = np.atleast_2d(np.asarray(values_EM, dtype=float))
    weights = np.ones(values_EM.shape[0]) if weights_E is None else np.asarray(weights_E, dtype=float)
    keep = np.isfinite(values_EM).all(axis=1) & np.isfinite(weights) & (weights > 0)
    if not keep.any():
        return np.full(values_EM.shape[1], math.nan)
    return np.average(values_EM[keep], axis=0, weights=weights[keep])


def layer_metrics(layers: dict[str, Any]) -> pd.DataFrame:
    """One row per layer: ``layer``, ``num_experts``, ``tokens_total`` and every key of
    :data:`~moe_lightning.analysis.steps.GEOMETRY_METRICS` (NaN where the report has no such value, e.g. alignment
    of a dense layer)."""
    rows = []
    for name, report in layers.items():
        scalars = report.scalars(prefix="")  # keys "/<quantity>[/mean]"
        row: dict[str, Any] = {"layer": name, "num_experts": report.num_experts, "tokens_total": report.total_tokens}
        for key, _ in GEOMETRY_METRICS:
            row[key] = scalars.get(f"/{key}", math.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=["layer", "num_experts", "tokens_total", *[k for k, _ in GEOMETRY_METRICS]])


def expert_mean_spectrum(report: Any) -> np.ndarray | None:
    """Mean expert-Jacobian spectrum of a layer, averaged over experts weighted by their gate mass Σw."""
    spectrum = report.spectra.get("jac_mean_spectrum")
    if spectrum is None or spectrum.numel() == 0:
        return None
    return weighted_expert_mean(spectrum.double().numpy(), report.weight_sum.double().numpy())


def expert_mean_pca(report: Any, site: str) -> np.ndarray | None:
    """PCA eigenvalues of a site, averaged over experts weighted by Σw (experts with another length left out)."""
    results = report.pca.get(site)
    if not results:
        return None
    vectors = [r.eigenvalues.double().numpy() for r in results]
    length = max(v.size for v in vectors)
    if length == 0:
        return None
    stack = np.vstack([v if v.size == length else np.full(length, math.nan) for v in vectors])
    return weighted_expert_mean(stack, report.weight_sum.double().numpy())


def alignment_and_subspaces(report: Any) -> dict[str, Any] | None:
    """The second paper's outputs for one layer, read from its report as the probe wrote them (docs/geometry.md §4–5):
    the E×E alignment matrix (``|cos|`` of the Frobenius inner product of the experts' mean Jacobians) against its
    chance level, and the E×E overlaps of the experts' functional and representational rank-``r`` subspaces (mean
    ``cos²`` of the principal angles) against theirs, side by side.

    Returns:
        None for a layer of one expert (there is no pair) or one with neither; else ``{"num_experts", "alignment":
        {"matrix", "mean_offdiag", "max_offdiag", "chance", "ratio"}, "subspace_overlap": {"rank", "chance",
        "functional", "representational"}}``, each of the last two ``{"matrix", "mean_offdiag", "max_offdiag"}``.
        A part the probe did not compute is None (the alignment and the functional subspaces need whole mean
        Jacobians). Matrices are lists of rows, NaN where an expert saw no tokens (for the subspaces, too few to
        determine them: docs/geometry.md §5).
    """
    matrices, layer = report.matrices, report.layer
    aligned, spanned = "align_mean_jacobian" in matrices, "subspace_rep_overlap" in matrices
    if report.num_experts < 2 or not (aligned or spanned):
        return None

    def overlap(kind: str) -> dict[str, Any] | None:
        if f"subspace_{kind}_overlap" not in matrices:
            return None
        return {
            "matrix": matrices[f"subspace_{kind}_overlap"].double().tolist(),
            "mean_offdiag": float(layer[f"subspace_{kind}_overlap"]),
            "max_offdiag": float(layer[f"subspace_{kind}_overlap_max"]),
        }

    alignment = None
    if aligned:
        alignment = {
            "matrix": matrices["align_mean_jacobian"].double().tolist(),
            "mean_offdiag": float(layer["align_mean_offdiag"]),
            "max_offdiag": float(layer["align_max_offdiag"]),
            "chance": float(layer["align_chance"]),
            "ratio": float(layer["align_ratio"]),
        }
    subspaces = None
    if spanned:
        subspaces = {
            "rank": int(layer["subspace_rank"]),
            "chance": float(layer["subspace_overlap_chance"]),
            "functional": overlap("fun"),
            "representational": overlap("rep"),
        }
    return {"num_experts": int(report.num_experts), "alignment": alignment, "subspace_overlap": subspaces}
