"""Weighted PCA (docs/geometry.md §3) against numpy's weighted covariance."""

import numpy as np
import pytest
import torch

from moe_lightning.geometry import WeightedCovariance, weighted_pca

DT = torch.float64


def np_effective_rank(lam):
    p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 5)) + 3.0
    w = rng.uniform(0.0, 1.0, 40)
    return x, w


def test_matches_numpy_weighted_covariance(data):
    x, w = data
    res = weighted_pca(torch.tensor(x), torch.tensor(w))
    # docs/geometry.md §3 divides by Σw: numpy's bias=True with aweights.
    cov = np.cov(x.T, aweights=w, bias=True)
    lam = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(res.eigenvalues.numpy(), lam, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.mean.numpy(), np.average(x, axis=0, weights=w), rtol=1e-12)
    V = res.eigenvectors.numpy()
    np.testing.assert_allclose(V @ np.diag(res.eigenvalues.numpy()) @ V.T, cov, atol=1e-10)
    assert res.n_eff == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert res.effective_rank == pytest.approx(np_effective_rank(lam), rel=1e-10)
    assert res.participation_ratio == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
    assert res.n90 == np.searchsorted(np.cumsum(lam) / lam.sum(), 0.9) + 1
    assert res.num_tokens == 40 and not res.undersampled


def test_integer_weights_equal_repeated_rows(data):
    x, _ = data
    reps = np.random.default_rng(1).integers(0, 4, len(x))
    weighted = weighted_pca(torch.tensor(x), torch.tensor(reps, dtype=DT))
    repeated = weighted_pca(torch.tensor(np.repeat(x, reps, axis=0)))
    np.testing.assert_allclose(weighted.eigenvalues.numpy(), repeated.eigenvalues.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weighted.mean.numpy(), repeated.mean.numpy(), rtol=1e-12)
    assert weighted.total_weight == repeated.total_weight


def test_metric_chunked_accumulation_equals_one_pass(data):
    x, w = data
    metric = WeightedCovariance(dim=5)
    for lo, hi in [(0, 7), (7, 8), (8, 30), (30, 40)]:
        metric.update(torch.tensor(x[lo:hi]), torch.tensor(w[lo:hi]))
    chunked = metric.compute()
    one = weighted_pca(torch.tensor(x), torch.tensor(w))
    np.testing.assert_allclose(chunked.eigenvalues.numpy(), one.eigenvalues.numpy(), rtol=1e-10, atol=1e-13)
    assert chunked.n_eff == pytest.approx(one.n_eff, rel=1e-12)


def test_metric_states_sum_across_ranks(data):
    """What DDP does with dist_reduce_fx='sum': two metrics' states added equal one metric on all the data."""
    x, w = data
    a, b, both = WeightedCovariance(dim=5), WeightedCovariance(dim=5), WeightedCovariance(dim=5)
    a.update(torch.tensor(x[:15]), torch.tensor(w[:15]))
    b.update(torch.tensor(x[15:]), torch.tensor(w[15:]))
    both.update(torch.tensor(x), torch.tensor(w))
    for name, reduce_fx in a._reductions.items():
        assert reduce_fx is torch.sum or getattr(reduce_fx, "__name__", "") in ("dim_zero_sum", "sum"), name
        torch.testing.assert_close(getattr(a, name) + getattr(b, name), getattr(both, name), rtol=1e-12, atol=1e-12)


def test_metric_drops_and_counts_nonfinite_rows(data):
    x, w = data
    xbad = x.copy()
    xbad[3, 1] = np.nan
    xbad[5, 0] = np.inf
    metric = WeightedCovariance(dim=5)
    metric.update(torch.tensor(xbad), torch.tensor(w))
    keep = np.ones(40, dtype=bool)
    keep[[3, 5]] = False
    ref = weighted_pca(torch.tensor(x[keep]), torch.tensor(w[keep]))
    assert metric.nonfinite.item() == 2
    np.testing.assert_allclose(metric.compute().eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-10)


def test_undersampled_and_empty():
    one = weighted_pca(torch.ones(1, 4, dtype=DT))
    assert one.undersampled and one.n_eff == 1.0
    assert one.effective_rank == 0.0  # zero covariance
    empty = weighted_pca(torch.ones(3, 4, dtype=DT), torch.zeros(3, dtype=DT))
    assert empty.undersampled and empty.num_tokens == 0
    assert np.isnan(empty.effective_rank) and torch.isnan(empty.eigenvalues).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="w_N"):
        weighted_pca(torch.ones(3, 2, dtype=DT), torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="nonnegative"):
        weighted_pca(torch.ones(3, 2, dtype=DT), -torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="dim"):
        WeightedCovariance(dim=0)
