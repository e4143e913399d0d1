"""Edge-of-stability thresholds (Cohen et al., 2021; 2022): Adam's preconditioned sharpness against the dense
``P^{-1/2} H P^{-1/2}`` of a tiny model (autograd Hessian, numpy ``eigvalsh``), the SGD thresholds against the
divergence of SGD itself on a quadratic, and nothing for other optimisers."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from moe_lightning.geometry.stability import edge_of_stability, sgd_stability_threshold

DT = torch.float64


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).double()
    x, y = torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT)

    def loss():
        return ((model(x) - y) ** 2).mean()

    return model, x, y, loss


def dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        parts, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return ((functional_call(model, parts, (x,)) - y) ** 2).mean()

    H = torch.autograd.functional.hessian(loss_of, flat).numpy()
    return (H + H.T) / 2


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_preconditioned_sharpness_matches_the_dense_preconditioned_hessian(kind):
    model, x, y, loss = tiny_problem()
    opt = kind(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-3)
    assert edge_of_stability(opt, loss, list(model.parameters())) == {}  # no state before the first step
    loss().backward()
    opt.step()
    opt.zero_grad()
    # P = (1 − β₁ᵗ)(sqrt(v/(1 − β₂ᵗ)) + ε) at t = 1, from the state as torch keeps it
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    diag_P = (1 - 0.9) * ((v / (1 - 0.99)).sqrt() + 1e-3)
    s = diag_P.rsqrt().numpy()
    exact = np.linalg.eigvalsh(s[:, None] * dense_hessian(model, x, y) * s[None, :])[-1]
    also = np.max(np.linalg.eigvals(np.diag(1 / diag_P.numpy()) @ dense_hessian(model, x, y)).real)
    got = edge_of_stability(opt, loss, list(model.parameters()), max_iter=20, tol=1e-12)
    assert got["preconditioned_top_eigenvalue"] == pytest.approx(exact, rel=1e-6)
    assert exact == pytest.approx(also, rel=1e-8)
    assert got["adam_stability_threshold"] == pytest.approx(38 / 0.01)
    assert got["preconditioned_top_converged"] == 1.0


def test_sgd_thresholds_and_nothing_for_other_optimisers():
    model, _, _, loss = tiny_problem()
    params = list(model.parameters())
    plain = torch.optim.SGD(params, lr=0.05)
    assert edge_of_stability(plain, loss, params) == {"sgd_stability_threshold": pytest.approx(2 / 0.05)}
    heavy = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    assert edge_of_stability(heavy, loss, params)["sgd_stability_threshold"] == pytest.approx(3.8 / 0.05)
    assert edge_of_stability(torch.optim.RMSprop(params, lr=0.01), loss, params) == {}
    assert edge_of_stability(None, loss, params) == {}
    split = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.2}])
    assert edge_of_stability(split, loss, params) == {}  # no single η
    assert edge_of_stability(torch.optim.SGD(params[:1], lr=0.1), loss, params) == {}  # a parameter it lacks


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True},
     {"momentum": 0.8, "weight_decay": 0.5}],
)  # fmt: skip
def test_sgd_threshold_is_where_sgd_itself_diverges_on_a_quadratic(options):
    """Torch's SGD on ``λ w²/2`` stays bounded just below the threshold and blows up just above it."""
    lr = 0.1
    limit = sgd_stability_threshold({"lr": lr, **options})

    def final_size(curvature):
        w = torch.ones(1, dtype=DT, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr, **options)
        for _ in range(500):
            opt.zero_grad()
            (0.5 * curvature * w**2).sum().backward()
            opt.step()
        return float(w.detach().abs())

    assert final_size(0.95 * limit) < 1.0
    assert final_size(1.05 * limit) > 1e3
