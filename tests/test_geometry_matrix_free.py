"""Matrix-free top-r singular values (GEOMETRY.md §1) against the exact SVD."""

import pytest
import torch
import torch.nn.functional as F

from moe_lightning.geometry import swiglu_expert_jacobian, topr_singular_values

DT = torch.float64


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_topr_matches_exact_on_random_swiglu_expert(method):
    gen = torch.Generator().manual_seed(0)
    D, H, N, r = 160, 320, 3, 6
    w_gate, w_up = (
        torch.randn(D, H, generator=gen, dtype=DT) / D**0.5,
        torch.randn(D, H, generator=gen, dtype=DT) / D**0.5,
    )
    w_down = torch.randn(H, D, generator=gen, dtype=DT) / H**0.5
    x = torch.randn(N, D, generator=gen, dtype=DT)

    def expert(x):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    exact = torch.linalg.svdvals(swiglu_expert_jacobian(x, w_gate, w_up, w_down))[:, :r]
    res = topr_singular_values(expert, x, r, oversample=10, max_iter=300, tol=1e-12, return_vectors=True, method=method)
    assert res.converged.all() and res.iterations < 300
    if method == "krylov":
        assert res.iterations * 16 < D  # converged before the Krylov basis filled the space
    torch.testing.assert_close(res.values, exact, rtol=1e-6, atol=0)
    # The residual estimate bounds the actual error.
    assert ((res.values - exact).abs() <= res.error_estimate + 1e-12).all()
    assert (res.error_estimate / exact < 1e-4).all()
    assert res.right_vectors.shape == (N, D, r)


def test_topr_caps_r_and_handles_zero_jacobian():
    x = torch.randn(3, 5, dtype=DT)
    res = topr_singular_values(lambda x: 0.0 * x, x, 10)
    assert res.values.shape == (3, 5)
    assert (res.values == 0).all() and res.converged.all()
    W = torch.randn(7, 5, dtype=DT)
    res = topr_singular_values(lambda x: x @ W.T, x, 2, oversample=0, max_iter=1)
    assert res.iterations == 1 and res.values.shape == (3, 2)
    assert (res.error_estimate >= 0).all()


def test_topr_does_not_touch_global_rng():
    x = torch.randn(2, 4, dtype=DT)
    state = torch.get_rng_state()
    topr_singular_values(torch.tanh, x, 2)
    assert torch.equal(state, torch.get_rng_state())
