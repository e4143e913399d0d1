"""The data-free weight spectra (docs/geometry.md §8): the norms and eigenvalues against numpy, what has no α, and
a layer's keys (α against the ``weightwatcher`` package is in test_weight_spectra_weightwatcher.py).

Shape legend: ``E`` experts, ``D`` model dim, ``H`` expert hidden width.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_lightning.geometry.weight_spectra import (
    PER_EXPERT_QUANTITIES,
    WEIGHT_QUANTITIES,
    WeightSpectra,
    fit_power_law,
    layer_weight_spectra,
    matrix_eigenvalues,
    matrix_quantities,
)


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Float32, as WeightWatcher reads a PyTorch layer's weights (it casts them to float32, then float64)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_t(3, size=(rows, cols))).float()


def test_norms_against_numpy_and_the_weights_stay_untouched() -> None:
    w = heavy_tailed(33, 21, seed=7)
    before = w.clone()
    quantities, eigenvalues = matrix_quantities(w)
    w_np = w.double().numpy()
    assert quantities["spectral_norm"] == pytest.approx(np.linalg.norm(w_np, 2), rel=1e-12)
    frobenius_squared = float(np.linalg.norm(w_np, "fro") ** 2)
    assert quantities["stable_rank"] == pytest.approx(frobenius_squared / np.linalg.norm(w_np, 2) ** 2, rel=1e-12)
    np.testing.assert_allclose(eigenvalues.numpy(), np.sort(np.linalg.eigvalsh(w_np.T @ w_np)), rtol=1e-9)
    assert torch.equal(w, before) and w.dtype == torch.float32


def test_too_few_eigenvalues_or_nonfinite_weights_give_no_alpha() -> None:
    # 7 eigenvalues: WeightWatcher skips such a matrix (min_evals=8); no α, the norms stay.
    quantities, _ = matrix_quantities(heavy_tailed(20, 7, seed=1))
    assert math.isnan(quantities["alpha"]) and math.isnan(quantities["alpha_stderr"])
    assert math.isfinite(quantities["spectral_norm"])
    # 10 eigenvalues of which 3 are zero: fewer than 8 enter the fit.
    w = heavy_tailed(20, 10, seed=2)
    w[:, 7:] = 0
    assert fit_power_law(matrix_eigenvalues(w)) is None
    w = heavy_tailed(20, 10, seed=3)
    w[0, 0] = math.nan
    quantities, eigenvalues = matrix_quantities(w)
    assert all(math.isnan(quantities[q]) for q in WEIGHT_QUANTITIES) and eigenvalues.numel() == 0


class _StackedView:
    """A minimal view offering stacked expert weights: ``w_in`` (E, D, H), ``w_out`` (E, H, D)."""

    name = "block"

    def __init__(self, w_in_EDH: torch.Tensor, w_out_EHD: torch.Tensor) -> None:
        self.w_in_EDH, self.w_out_EHD = w_in_EDH, w_out_EHD
        self.num_experts = w_in_EDH.shape[0]

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {"w_in": self.w_in_EDH[e], "w_out": self.w_out_EHD[e]}


def test_layer_spectra_keys_means_and_the_cap() -> None:
    E, D, H = 3, 24, 40
    w_in_EDH = torch.stack([heavy_tailed(D, H, seed=e) for e in range(E)])
    w_out_EHD = torch.stack([heavy_tailed(H, D, seed=10 + e) for e in range(E)])
    w_out_EHD[2, 0, 0] = math.inf  # expert 2's w_out has no value at all
    spectra = layer_weight_spectra(_StackedView(w_in_EDH, w_out_EHD))
    assert isinstance(spectra, WeightSpectra) and set(spectra.values) == {"w_in", "w_out"}
    for e in range(E):
        assert spectra.values["w_in"]["alpha"][e] == fit_power_law(matrix_eigenvalues(w_in_EDH[e])).alpha
    keys = spectra.scalars("weights/block", max_experts=2)
    alphas = spectra.values["w_in"]["alpha"]
    assert keys["weights/block/w_in/alpha/mean"] == pytest.approx(float(alphas.mean()))
    assert keys["weights/block/w_in/alpha/e1"] == float(alphas[1])
    assert "weights/block/w_in/alpha/e2" not in keys  # past the cap, kept in the mean
    stderr = spectra.values["w_in"]["alpha_stderr"]
    assert keys["weights/block/w_in/alpha/mean_stderr"] == pytest.approx(float(stderr.square().sum().sqrt()) / E)
    assert "weights/block/w_in/xmin/e0" not in keys and "weights/block/w_in/xmin/mean" in keys
    assert set(PER_EXPERT_QUANTITIES) == {"alpha", "spectral_norm"}
    # the non-finite expert has no key and stays out of the means
    out_alphas = spectra.values["w_out"]["alpha"][:2]
    assert keys["weights/block/w_out/alpha/mean"] == pytest.approx(float(out_alphas.mean()))
    norms = [np.linalg.norm(w_out_EHD[e].double().numpy(), 2) for e in range(2)]
    assert keys["weights/block/w_out/spectral_norm/mean"] == pytest.approx(float(np.mean(norms)), rel=1e-12)
    # the ESD: a density on log10 bins, integrating to one for each expert that has one
    esd = spectra.to_dict(esd_bins=16)["esd"]
    width = esd["w_in"]["log10_edges"][1] - esd["w_in"]["log10_edges"][0]
    assert all(sum(d) * width == pytest.approx(1.0) for d in esd["w_in"]["density"])
    assert esd["w_out"]["density"][2] == []


def test_a_view_without_weights_has_no_spectra() -> None:
    class NoWeights:
        name, num_experts = "x", 2

    assert layer_weight_spectra(NoWeights()) is None
