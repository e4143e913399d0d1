"""The factored core's singular values (docs/geometry.md §1, "Factored experts at any width") against the SVD of
each formed Jacobian, in every shape the core takes (square, wide and reduced by a QR first, ``H ≥ D``), and the
mean Jacobian's values and top subspaces against the SVD of the formed mean."""

import pytest
import torch

from moe_lightning.geometry import mlp_jacobian_operator, swiglu_jacobian_operator
from moe_lightning.geometry.factored import factored_core_rank, factored_singular_values, mean_jacobian_singular

DT = torch.float64


def _operator(kind, d, h, tokens, seed):
    """A SwiGLU or GELU-MLP expert's closed-form operator at random weights and tokens."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, d, dtype=DT)
    w_in, w_out = torch.randn(d, h, dtype=DT) / d**0.5, torch.randn(h, d, dtype=DT)
    if kind == "swiglu":
        return swiglu_jacobian_operator(x, w_in, torch.randn(d, h, dtype=DT) / d**0.5, w_out)
    return mlp_jacobian_operator(x, w_in, None, w_out, "gelu")


def _formed(op, d):
    """Every token's Jacobian formed from its products with the identity, ``(N, D, D)``."""
    eye = torch.eye(d, dtype=DT).expand(op.num_tokens, d, d)
    return op.apply(eye.contiguous())


@pytest.mark.parametrize(
    ("kind", "d", "h"),
    [
        ("swiglu", 64, 20),  # K_B = 2H = 40 > H: the wide core, reduced by a QR of each token's P
        ("swiglu", 64, 40),  # K_B = D = 64 < 2H = 80, still > H
        ("swiglu", 32, 48),  # H >= D: the core is D x D, nothing to reduce
        ("gelu", 64, 20),  # one group: K_B = H, nothing to reduce
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_core_singular_values_equal_the_formed_jacobians(kind, d, h, seed):
    op = _operator(kind, d, h, tokens=5, seed=seed)
    reference = torch.linalg.svdvals(_formed(op, d))
    got = factored_singular_values(op.factors, d)
    rank = factored_core_rank(op.factors)
    assert got.shape == reference.shape
    torch.testing.assert_close(got[:, :rank], reference[:, :rank], rtol=1e-10, atol=1e-12 * float(reference.max()))
    assert bool((got[:, rank:] == 0).all())
    if rank < d:  # the formed Jacobian's values past the rank are round-off
        assert float(reference[:, rank:].max()) < 1e-10 * float(reference.max())


@pytest.mark.parametrize(("kind", "d", "h"), [("swiglu", 64, 20), ("swiglu", 32, 48), ("gelu", 64, 20)])
def test_mean_jacobian_singular_equals_the_svd_of_the_formed_mean(kind, d, h):
    """Values and the top right singular subspaces of ``J̄ = A Σ_g diag(m_g) B_g``, reduced by a QR where the core
    is wide, against the SVD of the formed mean Jacobian (projectors compared: vectors are defined up to sign)."""
    op = _operator(kind, d, h, tokens=6, seed=3)
    weights = torch.rand(6, dtype=DT)
    mean_F = (weights[:, None] * op.factors.scales_NGH.reshape(6, -1)).sum(0) / weights.sum()
    mean_J = (weights[:, None, None] * _formed(op, d)).sum(0) / weights.sum()
    _, S_ref, Vh_ref = torch.linalg.svd(mean_J)
    S, Vh = mean_jacobian_singular(op.factors, mean_F, d)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12 * float(S_ref[0]))
    for r in (1, 3, 5):
        torch.testing.assert_close(Vh[:r].T @ Vh[:r], Vh_ref[:r].T @ Vh_ref[:r], rtol=0, atol=1e-9)
