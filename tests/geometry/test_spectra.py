"""Spectral statistics (docs/geometry.md §2) against numpy on known spectra."""

import contextlib
import math
import sys

import numpy as np
import pytest
import torch

from moe_lightning.geometry import (
    batched_svdvals,
    congruence_eigvalsh,
    decay_slope,
    effective_rank,
    n_components_for_variance,
    participation_ratio,
    spectral_stats,
    stable_rank,
    symmetric_gram,
)

DT = torch.float64


def np_effective_rank(s):
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def svdvals(A):
    return torch.linalg.svdvals(torch.as_tensor(A, dtype=DT))


def test_identity_has_effective_rank_d():
    for d in (1, 5, 17):
        s = svdvals(np.eye(d))
        assert effective_rank(s).item() == pytest.approx(d, rel=1e-12)
        assert stable_rank(s).item() == pytest.approx(d, rel=1e-12)


def test_rank_one_matrix_has_effective_rank_one():
    rng = np.random.default_rng(0)
    A = np.outer(rng.standard_normal(9), rng.standard_normal(9))
    s = svdvals(A)
    stats = spectral_stats(s)
    assert stats["effective_rank"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["stable_rank"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["sigma_max"].item() == pytest.approx(np.linalg.norm(A, 2), rel=1e-12)
    # One positive singular value: the decay slope is undefined.
    assert math.isnan(stats["decay_slope"].item())


def test_random_matrix_stats_match_numpy():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((12, 12))
    s_np = np.linalg.svd(A, compute_uv=False)
    stats = spectral_stats(svdvals(A))
    assert stats["sigma_max"].item() == pytest.approx(s_np[0], rel=1e-12)
    assert stats["frobenius"].item() == pytest.approx(np.linalg.norm(A, "fro"), rel=1e-12)
    assert stats["stable_rank"].item() == pytest.approx((s_np**2).sum() / s_np[0] ** 2, rel=1e-12)
    assert stats["effective_rank"].item() == pytest.approx(np_effective_rank(s_np), rel=1e-12)
    slope = -np.polyfit(np.log(np.arange(1, 13)), np.log(s_np), 1)[0]
    assert stats["decay_slope"].item() == pytest.approx(slope, rel=1e-10)


def test_power_law_spectrum_gives_exact_decay_slope():
    i = np.arange(1, 41)
    for alpha in (0.5, 1.0, 2.3):
        s = torch.tensor(3.0 * i**-alpha, dtype=DT)
        assert decay_slope(s).item() == pytest.approx(alpha, rel=1e-12)
        assert decay_slope(s, fit_max=10).item() == pytest.approx(alpha, rel=1e-12)


def test_geometric_spectrum_decay_slope_matches_numpy_fit():
    q, m, fit_max = 0.8, 30, 12
    s = q ** np.arange(m)
    A = np.diag(s)  # a matrix with this exact geometric spectrum
    expected = -np.polyfit(np.log(np.arange(1, fit_max + 1)), np.log(s[:fit_max]), 1)[0]
    assert decay_slope(svdvals(A), fit_max=fit_max).item() == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_spectrum_fits_positive_part_only():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0, 0.0], dtype=DT)
    expected = -np.polyfit(np.log([1, 2, 3]), np.log([4.0, 2.0, 1.0]), 1)[0]
    assert decay_slope(s).item() == pytest.approx(expected, rel=1e-12)


def test_zero_matrix_has_effective_rank_zero():
    stats = spectral_stats(torch.zeros(6, dtype=DT))
    assert stats["effective_rank"].item() == 0.0
    assert stats["stable_rank"].item() == 0.0
    assert stats["sigma_max"].item() == 0.0
    assert math.isnan(stats["decay_slope"].item())


def test_batched_stats_equal_per_matrix_stats():
    rng = np.random.default_rng(2)
    s = svdvals(rng.standard_normal((4, 5, 5)))
    batched = spectral_stats(s)
    for k in range(4):
        single = spectral_stats(s[k])
        for name, value in single.items():
            assert batched[name][k].item() == pytest.approx(value.item(), rel=1e-13)


def test_participation_ratio_and_n90_match_numpy():
    lam = np.array([5.0, 3.0, 1.0, 0.5, 0.5])
    assert participation_ratio(torch.tensor(lam)).item() == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-14)
    n90 = int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.9) + 1)
    assert n_components_for_variance(torch.tensor(lam)).item() == n90 == 3
    # Exactly on the boundary: 9 of 10 is 90%.
    assert n_components_for_variance(torch.tensor([9.0, 1.0], dtype=DT)).item() == 1
    assert participation_ratio(torch.ones(7, dtype=DT)).item() == pytest.approx(7.0)


@pytest.mark.parametrize("context", ["plain", "inference_mode"])
def test_batched_svdvals_equals_numpy_when_split_across_threads(context):
    """The CPU batch is split across worker threads (2 here); each slice must give numpy's singular values, in
    order, also for tensors made under inference_mode (the worker threads are not in it)."""
    spectra_module = sys.modules["moe_lightning.geometry.spectra"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode() if context == "inference_mode" else contextlib.nullcontext():
            A = torch.randn(21, 64, 50, generator=gen, dtype=torch.float64)  # 21 = 11 + 10: uneven halves
            spectra_module._SVD_POOL = None
            sv = batched_svdvals(A)
        assert spectra_module._SVD_POOL is not None and spectra_module._SVD_POOL[1] == 2  # the split path ran
    finally:
        torch.set_num_threads(threads)
    ref = np.linalg.svd(A.numpy(), compute_uv=False)
    assert sv.shape == (21, 50)
    np.testing.assert_allclose(sv.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_congruence_eigvalsh_matches_numpy(dtype, rtol):
    """The eigenvalues of U S_n Uᵀ (LAPACK's sygst on CPU) against numpy's of the formed product, with an R factor
    whose diagonal has both signs and an S_n that is only symmetric to round-off (its lower triangle is read)."""
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((30, 20)), mode="r") * np.where(np.arange(20) % 2, -1.0, 1.0)[:, None]
    x = rng.standard_normal((4, 20, 35))
    s = x @ x.transpose(0, 2, 1)
    s_lower = np.tril(s) + np.tril(s, -1).transpose(0, 2, 1)
    want = np.linalg.eigvalsh(u @ s_lower @ u.T)
    s_off = s.copy()
    s_off[:, np.triu_indices(20, 1)[0], np.triu_indices(20, 1)[1]] *= 1 + 1e-3  # an upper triangle it must not read
    got = congruence_eigvalsh(torch.tensor(u, dtype=dtype), torch.tensor(s_off, dtype=dtype))
    assert got.dtype == dtype and got.shape == (4, 20)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_congruence_eigvalsh_of_a_non_square_factor_and_of_non_finite_input():
    """A U that is not square takes the products (the same values), no tokens give no values, and a NaN gives
    torch's own error, as the eigensolver it replaces."""
    rng = np.random.default_rng(1)
    u = torch.tensor(np.triu(rng.standard_normal((5, 8))))
    x = torch.tensor(rng.standard_normal((3, 8, 9)))
    s = x @ x.mT
    want = torch.linalg.eigvalsh(u @ s @ u.T)
    torch.testing.assert_close(congruence_eigvalsh(u, s.clone()), want, rtol=1e-12, atol=1e-12)
    assert congruence_eigvalsh(u[:, :5], s[:0, :5, :5]).shape == (0, 5)
    bad = s[:, :5, :5].clone()
    bad[1, 2, 3] = bad[1, 3, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        congruence_eigvalsh(u[:, :5].contiguous(), bad)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_symmetric_gram_matches_numpy_in_either_layout(dtype, rtol):
    """X Xᵀ (BLAS syrk on CPU) against numpy's product, for a C-ordered X and a transposed view of one (the two
    layouts take different syrk calls), exactly symmetric; a tensor that needs its gradient takes torch's product."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 30))
    for given in (torch.tensor(x, dtype=dtype), torch.tensor(x.T.copy(), dtype=dtype).T):
        got = symmetric_gram(given)
        assert got.dtype == dtype and torch.equal(got, got.T)
        np.testing.assert_allclose(got.double().numpy(), x @ x.T, rtol=rtol, atol=rtol * np.abs(x @ x.T).max())
    leaf = torch.tensor(x, requires_grad=True)
    symmetric_gram(leaf).sum().backward()
    np.testing.assert_allclose(leaf.grad.numpy(), 2 * np.ones((7, 7)) @ x, rtol=1e-12)
