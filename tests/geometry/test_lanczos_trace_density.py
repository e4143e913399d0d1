"""Lanczos eigenvalues, Hutch++/Hutchinson traces and the SLQ density (docs/geometry.md §7) against the full
Hessian of a small MLP (scipy ``eigh``, exact traces of ``H`` and ``H²``).

Shape legend: ``P`` parameters (99 here), ``S`` SLQ starts.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import tanh_mlp_problem
from torch.autograd.functional import hessian

from moe_lightning.geometry import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos,
    slq_density,
)

DT = torch.float64


def mlp_problem(seed: int = 0):
    """A 4-12-3 tanh MLP on 40 points of unequal input scales, MSE loss: P = 99, an indefinite Hessian whose top
    eigenvalues stand out of the bulk (as a network's do; Papyan 2020)."""
    return tanh_mlp_problem((4, 12, 3), 40, input_scales=[3.0, 1.0, 0.5, 0.2], seed=seed)


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


def test_lanczos_top_k_matches_scipy_eigh_and_stops_early(problem):
    loss_fn, params, full = problem
    exact = scipy.linalg.eigh(full.numpy(), eigvals_only=True)[::-1]
    res = hessian_eigenvalues(loss_fn, params, k=3, which="largest", max_iter=99, tol=1e-8, return_vectors=True)
    assert res.all_converged and res.iterations < 60  # far fewer products than P = 99
    # each within its own residual (the a-posteriori bound), which is itself within tol · |θ|
    assert np.all(np.abs(res.eigenvalues.numpy() - exact[:3]) <= res.residuals.numpy() + 1e-13 * exact[0])
    # the reported residual is the true one, ‖H y − θ y‖, and each is within tol · |θ|
    for i in range(3):
        y = res.eigenvectors[:, i]
        true_residual = float((full @ y - res.eigenvalues[i] * y).norm())
        assert res.residuals[i].item() == pytest.approx(true_residual, rel=1e-3, abs=1e-12)
        assert true_residual <= 1e-8 * abs(res.eigenvalues[i].item()) * 1.01
    torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(3, dtype=DT), atol=1e-8, rtol=0)
    for p in params:
        assert p.grad is None


def test_lanczos_both_ends_and_magnitude(problem):
    loss_fn, params, full = problem
    exact = scipy.linalg.eigh(full.numpy(), eigvals_only=True)
    assert exact[0] < 0 < exact[-1]  # an indefinite Hessian: the negative end matters
    both = hessian_eigenvalues(loss_fn, params, k=2, which="both", max_iter=99, tol=1e-8)
    assert both.all_converged and len(both.eigenvalues) == 4
    np.testing.assert_allclose(both.eigenvalues.numpy(), [exact[-1], exact[-2], exact[0], exact[1]], rtol=1e-7)
    mag = hessian_eigenvalues(loss_fn, params, k=1, which="magnitude", max_iter=99, tol=1e-8)
    assert mag.eigenvalues.item() == pytest.approx(exact[np.abs(exact).argmax()], rel=1e-7)


def test_lanczos_residual_bounds_the_error_at_a_loose_tolerance(problem):
    loss_fn, params, full = problem
    exact = scipy.linalg.eigh(full.numpy(), eigvals_only=True)[::-1]
    res = hessian_eigenvalues(loss_fn, params, k=2, max_iter=99, tol=1e-2)
    tight = hessian_eigenvalues(loss_fn, params, k=2, max_iter=99, tol=1e-8)
    assert res.all_converged and res.iterations < tight.iterations
    for theta, r in zip(res.eigenvalues.tolist(), res.residuals.tolist(), strict=True):
        assert r <= 1e-2 * abs(theta)
        assert np.min(np.abs(exact - theta)) <= r  # a Ritz residual bounds the distance to the spectrum


def test_lanczos_max_iter_and_invariant_subspace():
    diag = torch.tensor([5.0, 5.0, 2.0, 2.0, 2.0, -1.0, -1.0, -1.0], dtype=DT)
    res = lanczos(lambda v: diag * v, torch.ones(8, dtype=DT), k=1, max_iter=50, tol=0.0)
    # three distinct eigenvalues: the Krylov space is invariant after 3 steps and the values are exact
    assert res.iterations == 3 and res.eigenvalues.item() == pytest.approx(5.0, rel=1e-12)
    short = lanczos(lambda v: diag * v, torch.arange(1.0, 9.0, dtype=DT), k=1, max_iter=2, tol=1e-12)
    assert short.iterations == 2 and not short.all_converged and short.residuals.item() > 0


def test_lanczos_rejects_bad_input_and_reports_nan(problem):
    v = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="which"):
        lanczos(lambda x: x, v, which="top")
    with pytest.raises(ValueError, match="k must be a positive int"):
        lanczos(lambda x: x, v, k=0)
    with pytest.raises(ValueError, match="v0"):
        lanczos(lambda x: x, torch.zeros(3, dtype=DT))
    with pytest.raises(FloatingPointError, match="non-finite"):
        lanczos(lambda x: x * float("nan"), v)


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    a = torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    a = a + a.T
    res = hutchpp(lambda v: a @ v, 6, num_matvecs=18, dtype=DT)
    assert res.trace == pytest.approx(torch.trace(a).item(), abs=1e-10) and res.std_error == 0.0


@pytest.mark.integration  # hundreds of estimator trials
def test_hutchpp_within_its_error_and_below_hutchinson_at_equal_budget(problem):
    loss_fn, params, full = problem
    exact = torch.trace(full).item()
    op = HessianOperator(loss_fn, params)
    pp, plain, z = [], [], []
    for seed in range(40):
        r = hutchpp(op, op.dim, num_matvecs=30, seed=seed, dtype=DT)
        pp.append(r.trace)
        z.append((r.trace - exact) / r.std_error)
        plain.append(hutchinson(op, op.dim, max_iter=30, tol=0.0, seed=seed, dtype=DT).trace)
    assert op.matvecs == 40 * 60
    # unbiased: the mean of 40 estimates is within 4 standard errors of the mean of the exact trace
    assert abs(np.mean(pp) - exact) < 4 * np.std(pp) / math.sqrt(40)
    # its standard error is honest: the standardised errors have roughly unit spread
    assert 0.5 < np.std(z) < 2.0
    assert np.var(pp) < 0.8 * np.var(plain)


def test_hessian_trace_methods_and_bad_input(problem):
    loss_fn, params, full = problem
    exact = torch.trace(full).item()
    for method in ("hutchpp", "hutchinson"):
        r = hessian_trace(loss_fn, params, method=method, num_matvecs=60, tol=0.0, seed=1)
        assert abs(r.trace - exact) < 4 * r.std_error and r.iterations == 60
    with pytest.raises(ValueError, match="method"):
        hessian_trace(loss_fn, params, method="xtrace")
    with pytest.raises(ValueError, match="num_matvecs must be a positive int"):
        hutchpp(lambda v: v, 5, num_matvecs=0)
    # below 3 products the sketch is empty: Hutchinson with the same draws
    op = HessianOperator(loss_fn, params)
    tiny = hutchpp(op, op.dim, num_matvecs=2, seed=4, dtype=DT)
    plain = hutchinson(op, op.dim, max_iter=2, tol=0.0, seed=4, dtype=DT)
    assert tiny.trace == pytest.approx(plain.trace, rel=1e-12) and tiny.iterations == 2


def test_slq_quadrature_is_exact_per_start_for_h_and_h_squared(problem):
    """Gauss quadrature with M ≥ 2 nodes integrates t and t² exactly: per start, Σ τθ = vᵀHv and Σ τθ² = ‖Hv‖²
    for the unit start v (the same seeded Gaussian draws)."""
    loss_fn, params, full = problem
    dens = hessian_spectral_density(loss_fn, params, num_starts=3, num_steps=10, seed=5)
    gen = torch.Generator().manual_seed(5)
    for s in range(3):
        v = torch.randn(99, generator=gen, dtype=DT)
        v = v / v.norm()
        w = dens.weights[s]
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (w * dens.nodes[s]).sum().item() == pytest.approx((v @ full @ v).item(), rel=1e-10)
        assert (w * dens.nodes[s] ** 2).sum().item() == pytest.approx((full @ v).norm().item() ** 2, rel=1e-10)
    assert dens.matvecs == 30


@pytest.mark.integration  # many Lanczos runs against exact traces
def test_slq_density_integrates_to_one_and_its_moments_match_exact_traces(problem):
    loss_fn, params, full = problem
    op = HessianOperator(loss_fn, params)
    dens = slq_density(op, op.dim, num_starts=60, num_steps=20, grid_size=2001, seed=0, dtype=DT)
    t, phi = dens.grid, dens.density
    assert torch.trapezoid(phi, t).item() == pytest.approx(1.0, abs=1e-6)
    # the broadened density keeps the mean and adds σ² to the second moment (the grid stops 4σ past the extreme
    # nodes, so their far tails, ~3e-5 of their small weights, are cut)
    assert torch.trapezoid(t * phi, t).item() == pytest.approx(dens.moment(1), rel=1e-4)
    assert torch.trapezoid(t**2 * phi, t).item() == pytest.approx(dens.moment(2) + dens.sigma**2, rel=1e-4)
    # P · moment estimates tr H and tr H² (Gaussian starts: unbiased; 5 standard errors over the starts)
    for power, exact in ((1, torch.trace(full).item()), (2, torch.trace(full @ full).item())):
        per_start = 99 * (dens.weights * dens.nodes**power).sum(-1)
        assert abs(99 * dens.moment(power) - exact) < 5 * per_start.std().item() / math.sqrt(60)
    counts, edges = dens.histogram()
    assert len(edges) == len(counts) + 1 and counts.sum().item() == pytest.approx(99, rel=1e-3)
    # the largest node of a 20-step run is the top eigenvalue (Lanczos converges at the ends first)
    assert dens.nodes.max().item() == pytest.approx(torch.linalg.eigvalsh(full).max().item(), rel=1e-6)


def test_hessian_operator_averages_over_ranks(problem):
    """With an all-reduce that sums two identical ranks the averaged product equals one process's."""
    loss_fn, params, full = problem
    calls = []

    def fake_all_reduce(t):
        calls.append(1)
        t.mul_(2)

    op = HessianOperator(loss_fn, params, all_reduce=fake_all_reduce, world_size=2)
    v = torch.randn(99, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op(v), full @ v, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1 and op.matvecs == 1
    with pytest.raises(ValueError, match="world_size"):
        HessianOperator(loss_fn, params, world_size=0)


@pytest.mark.integration  # a full reverse-mode Hessian of an MoE
def test_lanczos_on_a_soft_mlp_moe_matches_the_reverse_mode_hessian():
    """On an MoE network, against the full Hessian built by reverse-over-reverse autograd (523 parameters).

    ``torch.func.hessian`` (forward-over-reverse under vmap) is not used as the reference: on this model it returns
    an asymmetric matrix that disagrees with finite differences of the gradient."""
    from torch.func import functional_call

    from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

    torch.manual_seed(0)
    config = MLPMoEConfig(routing="soft", input_dim=6, output_dim=3, dim=8, expert_hidden=8, num_experts=3)
    model = MLPMoE(config).double().eval()
    x, y = torch.randn(64, 6, dtype=DT), torch.randn(64, 3, dtype=DT)
    names, params = zip(*model.named_parameters(), strict=True)
    sizes = [p.numel() for p in params]

    def flat_loss(theta):
        parts = {n: t.view(p.shape) for n, t, p in zip(names, torch.split(theta, sizes), params, strict=True)}
        return ((functional_call(model, parts, (x,)).output - y) ** 2).mean()

    full = hessian(flat_loss, torch.cat([p.detach().reshape(-1) for p in params]))
    exact = scipy.linalg.eigh(full.numpy(), eigvals_only=True)[::-1][:3]
    res = hessian_eigenvalues(lambda: ((model(x).output - y) ** 2).mean(), list(params), k=3, max_iter=200, tol=1e-10)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), exact, rtol=1e-8)
