"""Principal angles, Grassmann distances (docs/geometry.md §5) and alignment (§4) against scipy / Monte-Carlo."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from moe_lightning.geometry import (
    alignment_chance,
    grassmann_distance,
    jacobian_alignment,
    pairwise_grassmann,
    principal_angles,
    subspace_overlap_chance,
)
from moe_lightning.geometry.alignment import offdiag_summary, pointwise_cosine_sums

DT = torch.float64


def scipy_angles(A, B):
    return np.sort(scipy.linalg.subspace_angles(A, B))


@pytest.mark.parametrize("shape", [(10, 3, 3), (12, 4, 2), (12, 2, 5), (6, 6, 6)])
def test_principal_angles_match_scipy_random(shape):
    d, p, q = shape
    rng = np.random.default_rng(sum(shape))
    A, B = rng.standard_normal((d, p)), rng.standard_normal((d, q))
    ours = principal_angles(torch.tensor(A), torch.tensor(B)).numpy()
    np.testing.assert_allclose(ours, scipy_angles(A, B), rtol=0, atol=1e-8)


@pytest.mark.parametrize("eps", [1e-3, 1e-7, 1e-9, 1e-12])
def test_principal_angles_tiny_angles(eps):
    """Nearly identical subspaces: known angles eps, 2 eps, 3 eps; a plain arccos would return 0 or lose digits."""
    rng = np.random.default_rng(0)
    d, r = 9, 3
    Q, _ = np.linalg.qr(rng.standard_normal((d, 2 * r)))
    U, W = Q[:, :r], Q[:, r:]
    true = eps * np.arange(1, r + 1)
    V = U * np.cos(true) + W * np.sin(true)
    ours = principal_angles(torch.tensor(U), torch.tensor(V)).numpy()
    np.testing.assert_allclose(ours, true, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(ours, scipy_angles(U, V), rtol=0, atol=1e-8)
    if eps < 1e-6:  # arccos of the cosines cannot resolve these angles: the test would catch that implementation
        naive = np.arccos(np.clip(np.linalg.svd(U.T @ V, compute_uv=False), -1, 1))
        assert np.abs(np.sort(naive) - true).max() > 1e-3 * eps


def test_grassmann_distances_from_angles():
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    theta = scipy_angles(A, B)
    dist = grassmann_distance(torch.tensor(A), torch.tensor(B))
    assert dist.geodesic == pytest.approx(np.linalg.norm(theta), abs=1e-10)
    assert dist.projection == pytest.approx(np.linalg.norm(np.sin(theta)), abs=1e-10)
    assert dist.overlap == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-10)
    # Projection distance equals ‖P_A − P_B‖_F / √2.
    QA, QB = scipy.linalg.orth(A), scipy.linalg.orth(B)
    assert dist.projection == pytest.approx(np.linalg.norm(QA @ QA.T - QB @ QB.T) / math.sqrt(2), abs=1e-10)
    same = grassmann_distance(torch.tensor(A), torch.tensor(A @ rng.standard_normal((3, 3))))
    assert same.overlap == pytest.approx(1.0, abs=1e-12) and same.geodesic < 1e-7


def _scipy_distances(A, B):
    theta = scipy_angles(A, B)
    return {
        "geodesic": np.linalg.norm(theta),
        "projection": np.linalg.norm(np.sin(theta)),
        "overlap": np.mean(np.cos(theta) ** 2),
    }


@pytest.mark.parametrize("d, r", [(12, 3), (40, 1), (9, 9)])
def test_pairwise_grassmann_matches_scipy_and_the_pairwise_function(d, r):
    """Every pair of the batched distances against scipy's angles and grassmann_distance, with an expert without a
    basis and pairs at tiny angles (eps and 1e-9 rad), whose angles come from the residual's sines."""
    rng = np.random.default_rng(d + r)
    bases = [np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(4)]
    if 2 * r <= d:  # a copy of basis 0 turned by known tiny angles towards a complement
        W = np.linalg.qr(np.concatenate([bases[0], rng.standard_normal((d, r))], 1))[0][:, r:]
        bases += [bases[0] * np.cos(t) + W * np.sin(t) for t in (1e-9 * np.arange(1, r + 1), np.full(r, 1e-4))]
    given = [torch.tensor(b) for b in bases]
    given.insert(2, None)
    got = pairwise_grassmann(given)
    live = [i for i, b in enumerate(given) if b is not None]
    for q, M in got.items():
        torch.testing.assert_close(M, M.T, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(M[2]).all() and torch.isnan(M[:, 2]).all()
        for i in live:
            for j in live:
                ref = _scipy_distances(given[i].numpy(), given[j].numpy())[q]
                assert float(M[i, j]) == pytest.approx(ref, rel=1e-9, abs=1e-12), (q, i, j)
                one = getattr(grassmann_distance(given[i], given[j], orthonormal=True), q)
                assert float(M[i, j]) == pytest.approx(one, rel=1e-12, abs=1e-15), (q, i, j)
    if 2 * r <= d:  # the tiny angles are resolved (arccos of the cosines would give 0 or lose digits)
        tiny = 1e-9 * np.arange(1, r + 1)
        assert float(got["geodesic"][0, 5]) == pytest.approx(np.linalg.norm(tiny), rel=1e-6)  # after the None


def test_pairwise_grassmann_of_bases_of_different_ranks_pairs_them_one_by_one():
    rng = np.random.default_rng(1)
    bases = [torch.tensor(np.linalg.qr(rng.standard_normal((10, r)))[0]) for r in (2, 3, 2)]
    got = pairwise_grassmann(bases)
    for i in range(3):
        for j in range(3):
            ref = grassmann_distance(bases[i], bases[j], orthonormal=True).overlap
            assert float(got["overlap"][i, j]) == pytest.approx(ref, rel=1e-12)
    assert torch.isnan(pairwise_grassmann([None, None])["geodesic"]).all()


def test_subspace_overlap_chance_matches_monte_carlo():
    """E[mean cos² θ] for random r-subspaces of R^d is r/d; 2000 draws give a standard error below 0.003."""
    gen = torch.Generator().manual_seed(0)
    d, r, draws = 20, 4, 2000
    A = torch.linalg.qr(torch.randn(draws, d, r, generator=gen, dtype=DT))[0]
    B = torch.linalg.qr(torch.randn(draws, d, r, generator=gen, dtype=DT))[0]
    cos = torch.linalg.svdvals(A.transpose(1, 2) @ B)
    overlaps = (cos**2).mean(-1).numpy()
    for k in range(5):  # the batched shortcut is the overlap grassmann_distance reports
        assert grassmann_distance(A[k], B[k], orthonormal=True).overlap == pytest.approx(overlaps[k], rel=1e-12)
    overlaps = np.array(overlaps)
    stderr = overlaps.std() / math.sqrt(draws)
    assert abs(overlaps.mean() - subspace_overlap_chance(r, d)) < 4 * stderr


def test_alignment_chance_matches_monte_carlo():
    """E|cos| of independent Gaussian d×d matrices; tolerance 4 standard errors of 4000 draws."""
    gen = torch.Generator().manual_seed(1)
    d, draws = 6, 4000
    J = torch.randn(draws, 2, d, d, generator=gen, dtype=DT)
    s, c = pointwise_cosine_sums(J)
    cos = torch.stack([jacobian_alignment(J[k])[0, 1] for k in range(200)])
    assert c[0, 1].item() == draws
    mean = s[0, 1].item() / draws
    flat = J.reshape(draws, 2, -1)
    per = (flat[:, 0] * flat[:, 1]).sum(-1).abs() / flat[:, 0].norm(dim=-1) / flat[:, 1].norm(dim=-1)
    assert mean == pytest.approx(per.mean().item(), rel=1e-12)
    assert torch.allclose(cos, per[:200])
    stderr = per.std().item() / math.sqrt(draws)
    assert abs(mean - alignment_chance(d)) < 4 * stderr
    # The large-d form sqrt(2/π)/d (docs/geometry.md §4) agrees to O(1/d²).
    assert alignment_chance(64) == pytest.approx(math.sqrt(2 / math.pi) / 64, rel=1e-3)


def test_jacobian_alignment_matches_numpy_and_zero_is_nan():
    rng = np.random.default_rng(4)
    J = rng.standard_normal((3, 4, 4))
    J[2] = 0.0
    A = jacobian_alignment(torch.tensor(J)).numpy()
    ref = abs(np.sum(J[0] * J[1])) / np.linalg.norm(J[0]) / np.linalg.norm(J[1])
    assert A[0, 1] == pytest.approx(ref, rel=1e-12) and A[1, 0] == pytest.approx(ref, rel=1e-12)
    assert A[0, 0] == pytest.approx(1.0)
    assert np.isnan(A[2]).all() and np.isnan(A[:, 2]).all()
    mean_off, max_off = offdiag_summary(torch.tensor(A))
    assert mean_off == pytest.approx(ref) and max_off == pytest.approx(ref)
    assert all(math.isnan(v) for v in offdiag_summary(torch.ones(1, 1, dtype=DT)))
