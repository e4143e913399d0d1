"""The factored core's singular values (docs/geometry.md §1, "Factored experts at any width") against the SVD of
each formed Jacobian, in every shape the core takes: square, wide (reduced by a QR first) and with ``H ≥ D``."""

import pytest
import torch

from moe_lightning.geometry import mlp_jacobian_operator, swiglu_jacobian_operator
from moe_lightning.geometry.factored import factored_core_rank, factored_singular_values

DT = torch.float64


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
    torch.manual_seed(seed)
    x = torch.randn(5, d, dtype=DT)
    if kind == "swiglu":
        w = (torch.randn(d, h, dtype=DT) / d**0.5, torch.randn(d, h, dtype=DT) / d**0.5, torch.randn(h, d, dtype=DT))
        op = swiglu_jacobian_operator(x, *w)
    else:
        op = mlp_jacobian_operator(x, torch.randn(d, h, dtype=DT) / d**0.5, None, torch.randn(h, d, dtype=DT), "gelu")
    reference = torch.linalg.svdvals(_formed(op, d))
    got = factored_singular_values(op.factors, d)
    rank = factored_core_rank(op.factors)
    assert got.shape == reference.shape
    torch.testing.assert_close(got[:, :rank], reference[:, :rank], rtol=1e-10, atol=1e-12 * float(reference.max()))
    assert bool((got[:, rank:] == 0).all())
    if rank < d:  # the formed Jacobian's values past the rank are round-off
        assert float(reference[:, rank:].max()) < 1e-10 * float(reference.max())
