"""Curvature (docs/geometry.md §7): the dominant eigenvalue (Lanczos, ``which="magnitude"``) and the Hutchinson
trace against the full Hessian of a small model."""

import math

import pytest
import torch
from helpers import tanh_mlp_problem

from moe_lightning.geometry import hessian_eigenvalues, hessian_trace

DT = torch.float64


def small_problem():
    """A 2-4-1 tanh MLP on 16 points: 17 parameters, so its full Hessian is 17 × 17."""
    return tanh_mlp_problem((2, 4, 1), 16)


def test_top_eigenvalue_matches_full_hessian():
    loss_fn, params, full = small_problem()
    evals = torch.linalg.eigvalsh(full)
    dominant = evals[evals.abs().argmax()].item()
    res = hessian_eigenvalues(loss_fn, params, which="magnitude", max_iter=2000, tol=1e-13, return_vectors=True)
    assert res.all_converged and 1 < res.iterations <= 2000
    eigenvalue = res.eigenvalues.item()
    assert eigenvalue == pytest.approx(dominant, rel=1e-6)
    # The returned vector is an eigenvector: H v = λ v.
    v = res.eigenvectors[:, 0]
    torch.testing.assert_close(full @ v, eigenvalue * v, rtol=0, atol=1e-4 * abs(dominant))
    for p in params:  # observation leaves no gradient behind
        assert p.grad is None


def test_eigenvalues_respect_max_iter():
    loss_fn, params, _ = small_problem()
    res = hessian_eigenvalues(loss_fn, params, which="magnitude", max_iter=3, tol=0.0)
    assert res.iterations == 3 and not res.all_converged and res.residuals.item() > 0


def test_hutchinson_is_exact_for_diagonal_hessian():
    """Rademacher v has v_i² = 1, so vᵀ D v = tr D for a diagonal D: every sample is exact."""
    diag = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=DT)
    w = torch.zeros(4, dtype=DT, requires_grad=True)
    res = hessian_trace(lambda: 0.5 * (diag * w * w).sum(), [w], method="hutchinson", num_matvecs=5, tol=1e-12)
    assert res.trace == pytest.approx(diag.sum().item(), rel=1e-14)
    assert res.std_error == 0.0 and res.converged and res.iterations == 2


def test_hutchinson_matches_full_hessian_trace():
    loss_fn, params, full = small_problem()
    res = hessian_trace(loss_fn, params, method="hutchinson", num_matvecs=400, tol=0.0, seed=3)
    assert res.iterations == 400 and not res.converged
    # Unbiased estimator: within 4 standard errors of the exact trace.
    assert abs(res.trace - torch.trace(full).item()) < 4 * res.std_error
    assert res.std_error > 0 and math.isfinite(res.std_error)


def test_curvature_rejects_bad_settings():
    loss_fn, params, _ = small_problem()
    with pytest.raises(ValueError, match="max_iter"):
        hessian_eigenvalues(loss_fn, params, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        hessian_trace(loss_fn, params, method="hutchinson", tol=-1.0)
