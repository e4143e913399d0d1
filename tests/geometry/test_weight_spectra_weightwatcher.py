"""α, its x_min, KS distance and standard error, and the norms, against the ``weightwatcher`` package itself on the
same matrices (docs/geometry.md §8). WeightWatcher is a test dependency only (the ``dev`` extra): moe-lightning
implements the fit itself.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from moe_lightning.geometry.weight_spectra import fit_power_law, matrix_eigenvalues, matrix_quantities

ww = pytest.importorskip("weightwatcher")

# Heavy-tailed random matrices (Student-t entries, 3 degrees of freedom): (rows, cols). 12 and 16 eigenvalues take
# WeightWatcher's small-sample estimator (fewer than 20), the others its standard one.
SHAPES = ((96, 48), (200, 64), (48, 48), (40, 12), (30, 16))


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Float32, as WeightWatcher reads a PyTorch layer's weights (it casts them to float32, then float64)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_t(3, size=(rows, cols))).float()


def weightwatcher_details(weights: list[torch.Tensor]):
    """WeightWatcher's ``analyze`` on a model of ``nn.Linear`` layers holding ``weights``, with its documented fit
    options spelled out: a power law (``fit="PL"``), no finger fixing, exact SVD, no randomisation or plots."""
    layers = nn.ModuleList()
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        layers.append(linear)
    watcher = ww.WeightWatcher(model=layers, log_level=logging.ERROR)
    return watcher.analyze(
        fit="PL", fix_fingers=False, svd_method="accurate", randomize=False, mp_fit=False, plot=False
    )


def test_alpha_agrees_with_weightwatcher_on_the_same_matrices(capsys) -> None:
    weights = [heavy_tailed(rows, cols, seed) for seed, (rows, cols) in enumerate(SHAPES)]
    details = weightwatcher_details(weights)
    capsys.readouterr()  # WeightWatcher prints a line for a small-sample fit
    assert len(details) == len(SHAPES)
    for w, (_, row) in zip(weights, details.iterrows(), strict=True):
        fit = fit_power_law(matrix_eigenvalues(w))
        assert fit is not None
        # The same estimator on the same eigenvalues picks the same x_min, so α agrees far inside the fit's own
        # resolution, its standard error (α−1)/√n (0.4 to 1.1 here): the eigenvalues differ by the SVD's rounding
        # (1e-13 relative), which moves α by as much. A different x_min would move α by about that standard error,
        # and the x_min check below would name it.
        assert fit.xmin == pytest.approx(row["xmin"], rel=1e-9)
        assert fit.tail_size == row["num_pl_spikes"]
        assert fit.alpha == pytest.approx(row["alpha"], rel=1e-9)
        assert fit.alpha_stderr == pytest.approx(row["sigma"], rel=1e-9)
        assert fit.ks_distance == pytest.approx(row["D"], rel=1e-9)
        assert abs(fit.alpha - row["alpha"]) < 1e-3 * row["sigma"]
        # Its norms: WeightWatcher's spectral_norm column is λ_max = σ_max², its stable rank Σλ/λ_max.
        quantities, _ = matrix_quantities(w)
        assert quantities["spectral_norm"] ** 2 == pytest.approx(row["spectral_norm"], rel=1e-9)
        assert quantities["stable_rank"] == pytest.approx(row["stable_rank"], rel=1e-9)
        assert quantities["alpha_weighted"] == pytest.approx(row["alpha_weighted"], rel=1e-9)
