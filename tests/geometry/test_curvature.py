"""Curvature (docs/geometry.md §7): power iteration and Hutchinson against the full Hessian of a small model."""

import math

import pytest
import torch
from helpers import tanh_mlp_problem

from moe_lightning.geometry import hessian_top_eigenvalue, hutchinson_trace

DT = torch.float64


def small_problem():
    """A 2-4-1 tanh MLP on 16 points: 17 parameters, so its full Hessian is 17 × 17."""
    return tanh_mlp_problem((2, 4, 1), 16)


def test_top_eigenvalue_matches_full_hessian():
    loss_fn, params, full = small_problem()
    evals = torch.linalg.eigvalsh(full)
    dominant = evals[evals.abs().argmax()].item()
    res = hessian_top_eigenvalue(loss_fn, params, max_iter=2000, tol=1e-13)
    assert res.converged and 1 < res.iterations <= 2000
    assert res.eigenvalue == pytest.approx(dominant, rel=1e-6)
    # The returned vector is an eigenvector: H v = λ v.
    v = torch.cat([t.reshape(-1) for t in res.eigenvector])
    torch.testing.assert_close(full @ v, res.eigenvalue * v, rtol=0, atol=1e-4 * abs(dominant))
    for p in params:  # observation leaves no gradient behind
        assert p.grad is None


def test_power_iteration_respects_max_iter():
    loss_fn, params, _ = small_problem()
    res = hessian_top_eigenvalue(loss_fn, params, max_iter=3, tol=0.0)
    assert res.iterations == 3 and not res.converged and res.relative_change > 0


def test_hutchinson_is_exact_for_diagonal_hessian():
    """Rademacher v has v_i² = 1, so vᵀ D v = tr D for a diagonal D: every sample is exact."""
    diag = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=DT)
    w = torch.zeros(4, dtype=DT, requires_grad=True)
    res = hutchinson_trace(lambda: 0.5 * (diag * w * w).sum(), [w], max_iter=5, tol=1e-12)
    assert res.trace == pytest.approx(diag.sum().item(), rel=1e-14)
    assert res.std_error == 0.0 and res.converged and res.iterations == 2


def test_hutchinson_matches_full_hessian_trace():
    loss_fn, params, full = small_problem()
    res = hutchinson_trace(loss_fn, params, max_iter=400, tol=0.0, seed=3)
    assert res.iterations == 400 and not res.converged
    # Unbiased estimator: within 4 standard errors of the exact trace.
    assert abs(res.trace - torch.trace(full).item()) < 4 * res.std_error
    assert res.std_error > 0 and math.isfinite(res.std_error)


def test_curvature_rejects_bad_settings():
    loss_fn, params, _ = small_problem()
    with pytest.raises(ValueError, match="max_iter"):
        hessian_top_eigenvalue(loss_fn, params, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        hutchinson_trace(loss_fn, params, tol=-1.0)
