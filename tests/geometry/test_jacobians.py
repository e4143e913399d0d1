"""Exact Jacobians vs torch.autograd.functional.jacobian (docs/geometry.md §1), float64 to 1e-10."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian as autograd_jacobian

from moe_lightning.geometry import (
    jacobians,
    layer_jacobian,
    mlp_expert_jacobian,
    swiglu_expert_jacobian,
)
from moe_lightning.geometry.activations import activation_derivative

DT = torch.float64
D, H, N = 6, 10, 7


def reference(fn, x_ND):
    """Per-token loop of torch.autograd.functional.jacobian: the independent reference."""
    return torch.stack([autograd_jacobian(lambda xi: fn(xi.unsqueeze(0)).squeeze(0), x) for x in x_ND])


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {
        "w_in": torch.randn(D, H, generator=g, dtype=DT),
        "b_in": torch.randn(H, generator=g, dtype=DT),
        "w_out": torch.randn(H, D + 1, generator=g, dtype=DT),  # D_out != D_in checks the transpose
        "w_gate": torch.randn(D, H, generator=g, dtype=DT),
        "w_up": torch.randn(D, H, generator=g, dtype=DT),
        "w_down": torch.randn(H, D, generator=g, dtype=DT),
        "x": torch.randn(N, D, generator=g, dtype=DT),
    }


ACTS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


@pytest.mark.parametrize("name", sorted(ACTS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_mlp_closed_form_matches_autograd(weights, name, with_bias):
    w = weights
    b = w["b_in"] if with_bias else None
    act = ACTS[name]

    def f(x):
        z = x @ w["w_in"]
        return act(z + b if b is not None else z) @ w["w_out"]

    J = mlp_expert_jacobian(w["x"], w["w_in"], b, w["w_out"], name)
    assert J.shape == (N, D + 1, D)
    torch.testing.assert_close(J, reference(f, w["x"]), rtol=0, atol=1e-10)


def test_mlp_closed_form_callable_activation(weights):
    w = weights

    def act(z):
        return torch.sin(z) * z

    def f(x):
        return act(x @ w["w_in"] + w["b_in"]) @ w["w_out"]

    J = mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], act)
    torch.testing.assert_close(J, reference(f, w["x"]), rtol=0, atol=1e-10)


def test_relu_derivative_at_zero_matches_autograd():
    z = torch.tensor([-1.0, 0.0, 2.0], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(z).sum(), z)
    torch.testing.assert_close(activation_derivative("relu", z.detach()), g)


def test_swiglu_closed_form_matches_autograd(weights):
    w = weights

    def f(x):
        return (F.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]

    J = swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"])
    torch.testing.assert_close(J, reference(f, w["x"]), rtol=0, atol=1e-10)


def test_chunked_closed_forms_equal_one_pass(weights):
    w = weights
    full = swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"])
    tiny = swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"], memory_budget_bytes=1)
    torch.testing.assert_close(tiny, full, rtol=0, atol=0)
    full = mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], "gelu")
    tiny = mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], "gelu", memory_budget_bytes=1)
    torch.testing.assert_close(tiny, full, rtol=0, atol=0)


def test_closed_forms_with_a_partial_last_chunk(weights):
    """Chunks of 3 tokens for N = 7 (3 + 3 + 1) reuse one scratch buffer; the result must equal one pass."""
    w = weights
    full = swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"])
    per_token = 8 * D * (H + D)  # float64 scratch of M(x)ᵀ (D_in, H) and of Jᵀ (D_in, D_out)
    chunked = swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"], memory_budget_bytes=3 * per_token)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-13)
    full = mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], "gelu")
    per_token = 8 * D * (H + D)  # float64 scratch of w_in diag(φ') (D_in, H) and of Jᵀ (D_in, D_out)
    chunked = mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], "gelu", memory_budget_bytes=3 * per_token)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-13)


def test_closed_forms_are_differentiable_when_weights_require_grad(weights):
    """With grad enabled the closed forms skip their out= buffers; d(Σ R ⊙ J)/dW must equal autograd's."""
    w = {k: v.clone().requires_grad_(k != "x") for k, v in weights.items()}
    R = torch.randn(N, D + 1, D, generator=torch.Generator().manual_seed(5), dtype=DT)

    def mlp(x):
        return F.gelu(x @ w["w_in"] + w["b_in"]) @ w["w_out"]

    def swiglu(x):
        return (F.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]

    cases = [
        (mlp, mlp_expert_jacobian(w["x"], w["w_in"], w["b_in"], w["w_out"], "gelu"), ["w_in", "b_in", "w_out"]),
        (swiglu, swiglu_expert_jacobian(w["x"], w["w_gate"], w["w_up"], w["w_down"]), ["w_gate", "w_up", "w_down"]),
    ]
    for fn, J, names in cases:
        ref = torch.stack(
            [autograd_jacobian(lambda xi, fn=fn: fn(xi.unsqueeze(0)).squeeze(0), x, create_graph=True) for x in w["x"]]
        )
        R_J = R[:, : J.shape[1]]
        params = [w[name] for name in names]
        got = torch.autograd.grad((R_J * J).sum(), params)
        want = torch.autograd.grad((R_J * ref).sum(), params)
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_closed_forms_with_no_tokens(weights):
    w = weights
    x0 = w["x"][:0]
    assert swiglu_expert_jacobian(x0, w["w_gate"], w["w_up"], w["w_down"]).shape == (0, D, D)
    assert mlp_expert_jacobian(x0, w["w_in"], w["b_in"], w["w_out"], "gelu").shape == (0, D + 1, D)


@pytest.mark.parametrize("mode", ["auto", "jacfwd", "jacrev"])
@pytest.mark.parametrize("budget", [1, 2**30])
def test_torch_func_jacobians_match_autograd(weights, mode, budget):
    w = weights

    def gelu_expert(x):
        return F.gelu(x @ w["w_in"] + w["b_in"]) @ w["w_out"]

    def swiglu_expert(x):
        return (F.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]

    for fn in (gelu_expert, swiglu_expert):
        J = jacobians(fn, w["x"], mode=mode, memory_budget_bytes=budget)
        torch.testing.assert_close(J, reference(fn, w["x"]), rtol=0, atol=1e-10)


def test_jacobians_rejects_bad_mode(weights):
    with pytest.raises(ValueError, match="mode"):
        jacobians(lambda x: x, weights["x"], mode="fast")


def test_jacobians_empty_input():
    J = jacobians(lambda x: torch.cat([x, x], -1), torch.zeros(0, 3, dtype=DT))
    assert J.shape == (0, 6, 3)


class _View:
    """A tiny hand-made MoEView: GELU experts with a soft or top-k router."""

    def __init__(self, routing, num_experts=3, closed_form=True, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.name, self.module, self.num_experts = "toy", None, num_experts
        self.router = torch.randn(D, num_experts, generator=g, dtype=DT)
        self.w = [
            (torch.randn(D, H, generator=g, dtype=DT), torch.randn(H, D, generator=g, dtype=DT))
            for _ in range(num_experts)
        ]
        self.routing, self.closed_form = routing, closed_form

    def gates(self, x):
        logits = x @ self.router
        if self.routing == "soft":
            return logits.softmax(-1)
        vals, idx = logits.topk(2, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))

    def expert(self, e):
        w_in, w_out = self.w[e]
        return lambda x: F.gelu(x @ w_in) @ w_out

    def expert_hidden(self, e):
        return None

    def expert_jacobian(self, e, x):
        return mlp_expert_jacobian(x, self.w[e][0], None, self.w[e][1], "gelu") if self.closed_form else None


@pytest.mark.parametrize("routing", ["soft", "topk"])
@pytest.mark.parametrize("method", ["func", "compose"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_layer_jacobian_through_router_matches_autograd(routing, method, closed_form):
    view = _View(routing, closed_form=closed_form)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=DT)

    def layer(x):
        g = view.gates(x)
        return sum(g[:, e : e + 1] * view.expert(e)(x) for e in range(view.num_experts))

    J = layer_jacobian(view, x, method=method)
    ref = reference(layer, x)
    torch.testing.assert_close(J, ref, rtol=0, atol=1e-10)
    # The router term matters: dropping it changes the answer.
    g = view.gates(x)
    no_router = sum(g[:, e, None, None] * reference(view.expert(e), x) for e in range(view.num_experts))
    assert (ref - no_router).abs().max() > 1e-3
