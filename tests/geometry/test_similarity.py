"""Linear CKA between experts: the additive statistics against a numpy linear CKA, the chance level against a
Monte Carlo, a two-shard sum against one pass, and the probe's keys on a native MoELayer."""

import dataclasses

import numpy as np
import pytest
import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, finalize, probe, probe_statistics
from moe_lightning.geometry.alignment import offdiag_summary
from moe_lightning.geometry.similarity import cka_chance, linear_cka, linear_cka_from_sums, linear_cka_sums


def numpy_linear_cka(x, y):
    """Kornblith et al. (2019), linear kernel, in the HSIC form on centred Gram matrices ``K = X Xᵀ``."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def cka_matrix_numpy(f_NED):
    e = f_NED.shape[1]
    return np.array([[numpy_linear_cka(f_NED[:, i], f_NED[:, j]) for j in range(e)] for i in range(e)])


def test_sums_match_numpy_cka_and_two_halves_add_up():
    g = torch.Generator().manual_seed(0)
    f_NED = torch.randn(30, 3, 5, generator=g, dtype=torch.float64)
    f_NED[:, 1] = f_NED[:, 0] @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.1 * f_NED[:, 1]
    ref = cka_matrix_numpy(f_NED.numpy())
    s, c = linear_cka_sums(f_NED)
    np.testing.assert_allclose(linear_cka_from_sums(30, s, c).numpy(), ref, rtol=1e-10)
    (s0, c0), (s1, c1) = linear_cka_sums(f_NED[:11]), linear_cka_sums(f_NED[11:])
    np.testing.assert_allclose(linear_cka_from_sums(30, s0 + s1, c0 + c1).numpy(), ref, rtol=1e-10)
    assert linear_cka(f_NED[:, 0], f_NED[:, 2]) == pytest.approx(ref[0, 2], rel=1e-10)
    # invariant to an orthogonal map and an isotropic scale of one side, as linear CKA is
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert linear_cka(3.0 * f_NED[:, 0] @ q + 1.0, f_NED[:, 2]) == pytest.approx(ref[0, 2], rel=1e-10)


def test_chance_level_matches_a_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for n, d in ((16, 4), (64, 8)):
        pairs = [torch.randn(2, n, d, generator=g, dtype=torch.float64) for _ in range(200)]
        draws = [linear_cka(x, y) for x, y in pairs]
        assert cka_chance(n, d) == pytest.approx(float(np.mean(draws)), rel=0.08)


def test_probe_cka_on_a_native_layer(tiny_moe_layer):
    layer = tiny_moe_layer()
    (view,) = find_moe_layers(layer)
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = ProbeConfig(jacobian=False, layer_jacobian=False, pca=False, subspaces=False)
    report = probe(view, x, cfg)
    with torch.no_grad():
        f_NED = torch.stack([view.expert(e)(x) for e in range(4)], 1)
    ref = cka_matrix_numpy(f_NED.numpy())
    np.testing.assert_allclose(report.matrices["cka"].numpy(), ref, rtol=1e-9)
    off = ref[~np.eye(4, dtype=bool)]
    assert report.layer["cka_mean"] == pytest.approx(off.mean(), rel=1e-9)
    assert report.layer["cka_max"] == pytest.approx(off.max(), rel=1e-9)
    assert report.layer["cka_chance"] == pytest.approx(8 / (24 + 8))
    # two shards' statistics summed give the one-pass value
    halves = finalize([probe_statistics(view, x[:10], cfg), probe_statistics(view, x[10:], cfg)])
    torch.testing.assert_close(halves.matrices["cka"], report.matrices["cka"], rtol=1e-10, atol=1e-12)
    # the switch removes the keys and leaves the others' values as they were
    without = probe(view, x, dataclasses.replace(cfg, cka=False))
    assert "cka" not in without.matrices and "cka_mean" not in without.layer
    for k, v in without.layer.items():
        assert report.layer[k] == pytest.approx(v, nan_ok=True)
    assert offdiag_summary(report.matrices["cka"])[1] <= 1.0


def test_cka_is_skipped_when_its_cross_products_are_too_large(tiny_moe_layer):
    (view,) = find_moe_layers(tiny_moe_layer())
    x = torch.randn(8, 8, dtype=torch.float64)
    report = probe(view, x, ProbeConfig(jacobian=False, layer_jacobian=False, pca=False, pca_max_dim=16))
    assert report.variants["cka"].startswith("skipped_too_large") and "cka_mean" not in report.layer
