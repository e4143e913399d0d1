"""Every dispatch path gives the loop path's forward and backward (float32, 1e-6 of each tensor's scale), for every
routing."""

import pytest
import torch
import torch.nn.functional as F
from helpers import dispatch_case

from moe_lightning.nn import experts
from moe_lightning.nn.layer import MoEConfig, MoELayer


def run(layer: MoELayer, dispatch: str, x: torch.Tensor, grad_out: torch.Tensor):
    layer.config.dispatch = dispatch
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y, aux = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.w_in.grad, layer.w_out.grad, layer.router.weight.grad, aux


CASES = [
    ("topk", None, "gelu"),
    ("topk", None, "swiglu"),
    ("topk", 0.75, "gelu"),  # capacity-limited: some assignments are dropped
    ("topk", 1.25, "swiglu"),
    ("soft", None, "gelu"),
    ("soft", None, "swiglu"),
]


@pytest.mark.parametrize("routing,capacity_factor,activation", CASES)
def test_paths_match_loop(routing, capacity_factor, activation):
    layer, x, grad_out = dispatch_case(routing, capacity_factor, activation)
    reference = run(layer, "loop", x, grad_out)
    paths = ["sorted", "grouped"] + (["bmm"] if routing == "soft" else [])
    for path in paths:
        got = run(layer, path, x, grad_out)
        for a, b in zip(got[:5], reference[:5]):
            # float32 sums in another order (bmm over all experts): ~1e-7 of the tensor's largest entry, which on
            # some CPUs' kernels exceeded a fixed atol of 1e-6 for the router gradient (max |entry| ~8)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(1.0, b.abs().max().item()))
        assert torch.equal(got[5].tokens_per_expert, reference[5].tokens_per_expert)
        assert got[5].dropped.item() == reference[5].dropped.item()
    if capacity_factor is not None and capacity_factor < 1:
        assert reference[5].dropped.item() > 0


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "grouped"])
def test_empty_experts(dispatch):
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(dim=16, expert_hidden=16, num_experts=4, top_k=1, dispatch=dispatch))
    with torch.no_grad():  # experts 2 and 3 never win
        layer.router.weight[2:] = -100.0 * layer.router.weight[:2].abs().sum(0)
    x = torch.randn(10, 16).abs()
    y, aux = layer(x)
    assert aux.tokens_per_expert[2:].sum().item() == 0
    y.sum().backward()
    assert torch.count_nonzero(layer.w_in.grad[2:]) == 0
    # expert-by-expert reference, written out with plain ops
    gates = layer.router.gates(x)
    reference = sum(gates[:, e : e + 1] * (F.gelu(x @ layer.w_in[e]) @ layer.w_out[e]) for e in range(4))
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["sorted", "grouped", "bmm"])
def test_deterministic_mode_is_bitwise_repeatable(dispatch):
    routing = "soft" if dispatch == "bmm" else "topk"
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(2)
            layer = MoELayer(MoEConfig(dim=16, expert_hidden=16, num_experts=4, routing=routing, dispatch=dispatch))
            x = torch.randn(32, 16, requires_grad=True)
            y, _ = layer(x)
            y.square().sum().backward()
            results.append((y.detach(), x.grad, layer.w_in.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


def test_grouped_falls_back_for_float64_with_one_warning(monkeypatch):
    monkeypatch.setattr(experts, "_warned_fallback", set())
    layer = MoELayer(MoEConfig(dim=8, expert_hidden=8, num_experts=4, dispatch="grouped")).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="using 'sorted'"):
        y, _ = layer(x)
    layer.config.dispatch = "sorted"
    torch.testing.assert_close(y, layer(x)[0])


def test_auto_dispatch_is_sorted_on_cpu_and_grouped_on_cuda():
    from moe_lightning.nn.experts import auto_sparse_dispatch

    assert auto_sparse_dispatch(torch.device("cpu")) == "sorted"
    assert auto_sparse_dispatch(torch.device("cuda", 0)) == "grouped"
    torch.manual_seed(0)
    auto = MoELayer(MoEConfig(dim=16, expert_hidden=8, num_experts=4, top_k=2, dispatch="auto"))
    explicit = MoELayer(MoEConfig(dim=16, expert_hidden=8, num_experts=4, top_k=2, dispatch="sorted"))
    explicit.load_state_dict(auto.state_dict())
    x = torch.randn(2, 5, 16)
    # Same path, so bitwise the same output.
    assert torch.equal(auto(x)[0], explicit(x)[0])
