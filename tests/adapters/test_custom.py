"""register_moe_class: a user's own MoE layer, found by find_moe_layers and checked against its own forward."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from moe_lightning.adapters import find_moe_layers, registered_adapters
from moe_lightning.adapters.custom import ADAPTER_NAME, register_moe_class
from moe_lightning.geometry import MoEView

D, H, E = 8, 12, 3


class TanhTop1MoE(nn.Module):
    """A user's layer: softmax router, top-1 hard routing scaled by the winning probability, tanh MLP experts."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, E)
        self.w_in = nn.Parameter(torch.randn(E, H, D) / D**0.5)
        self.w_out = nn.Parameter(torch.randn(E, D, H) / H**0.5)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        probs_NE = self.router(x_ND).softmax(-1)
        best_prob_N, best_N = probs_NE.max(-1)
        out_ND = torch.zeros_like(x_ND)
        for n in range(x_ND.shape[0]):  # deliberately naive: the reference is the layer's own loop
            e = int(best_N[n])
            out_ND[n] = best_prob_N[n] * (self.w_out[e] @ torch.tanh(self.w_in[e] @ x_ND[n]))
        return out_ND


class SubclassedMoE(TanhTop1MoE):
    pass


def top1_gates(m: TanhTop1MoE, x_ND: torch.Tensor) -> torch.Tensor:
    probs_NE = m.router(x_ND).softmax(-1)
    best_NE = torch.nn.functional.one_hot(probs_NE.argmax(-1), E).to(probs_NE.dtype)
    return probs_NE * best_NE


def tanh_hidden(m: TanhTop1MoE, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x_ND @ m.w_in[e].T)


def tanh_expert(m: TanhTop1MoE, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    return tanh_hidden(m, e, x_ND) @ m.w_out[e].T


def tanh_jacobian(m: TanhTop1MoE, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    # J = W_out diag(1 - tanh²(W_in x)) W_in
    slope_NH = 1 - tanh_hidden(m, e, x_ND) ** 2
    return torch.einsum("dh,nh,hk->ndk", m.w_out[e], slope_NH, m.w_in[e])


def tanh_operator(m: TanhTop1MoE, e: int, x_ND: torch.Tensor):
    from moe_lightning.geometry import mlp_jacobian_operator

    # our (D, H) / (H, D) right-multiplied layout: f(x) = tanh(x @ w_in[e].T) @ w_out[e].T
    return mlp_jacobian_operator(x_ND, m.w_in[e].T.to(x_ND.dtype), None, m.w_out[e].T.to(x_ND.dtype), "tanh")


@pytest.fixture
def registered() -> None:
    register_moe_class(
        TanhTop1MoE,
        gates=top1_gates,
        expert=tanh_expert,
        num_experts=lambda m: m.w_in.shape[0],
        expert_hidden=tanh_hidden,
        expert_jacobian=tanh_jacobian,
        expert_jacobian_operator=tanh_operator,
    )


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), TanhTop1MoE(), nn.Sequential(nn.Tanh(), SubclassedMoE()))


def test_layers_found_including_subclasses(registered) -> None:
    views = find_moe_layers(make_model())
    assert [(v.name, v.num_experts) for v in views] == [("1", E), ("2.1", E)]
    assert all(isinstance(v, MoEView) for v in views)
    names = registered_adapters()  # user classes are matched before any adapter that was registered normally
    assert names.count(ADAPTER_NAME) == 1
    assert all(names.index(ADAPTER_NAME) < names.index(n) for n in names if n.startswith("hf-") or n == "moe_lightning")


def test_views_reproduce_the_layer(registered) -> None:
    model = make_model()
    x_ND = torch.randn(6, D)
    for view in find_moe_layers(model):
        with torch.no_grad():
            recon_ND = sum(view.gates(x_ND)[:, e : e + 1] * view.expert(e)(x_ND) for e in range(E))
            torch.testing.assert_close(recon_ND, view.module(x_ND))
        for e in range(E):
            hidden_NH = view.expert_hidden(e)(x_ND)
            assert hidden_NH.shape == (6, H)
            jac_NDD = view.expert_jacobian(e, x_ND)
            for n in range(2):
                ref_DD = torch.autograd.functional.jacobian(
                    lambda x: view.expert(e)(x[None])[0], x_ND[n], vectorize=True
                )
                torch.testing.assert_close(jac_NDD[n], ref_DD)
            op = view.expert_jacobian_operator(e, x_ND)  # products J V / Jᵀ U without forming J
            V_NDK = torch.randn(6, D, 2)
            with torch.no_grad():
                torch.testing.assert_close(op.apply(V_NDK), jac_NDD @ V_NDK)
                torch.testing.assert_close(op.apply_transpose(V_NDK), jac_NDD.mT @ V_NDK)


def test_registering_again_replaces_callables(registered) -> None:
    register_moe_class(TanhTop1MoE, gates=lambda m, x: m.router(x).softmax(-1), expert=tanh_expert, num_experts=E)
    try:
        view = find_moe_layers(make_model())[0]
        x_ND = torch.randn(4, D)
        assert view.expert_hidden(0) is None and view.expert_jacobian(0, x_ND) is None
        assert view.expert_jacobian_operator(0, x_ND) is None
        torch.testing.assert_close(view.gates(x_ND), view.module.router(x_ND).softmax(-1))
        assert registered_adapters().count(ADAPTER_NAME) == 1
    finally:  # leave the class registered as the other tests expect
        register_moe_class(TanhTop1MoE, gates=top1_gates, expert=tanh_expert, num_experts=E, expert_hidden=tanh_hidden)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cls=int), "cls=<class 'int'>"),
        (dict(gates="router"), "gates='router'"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(expert_jacobian=3), "expert_jacobian=3"),
        (dict(expert_jacobian_operator="J"), "expert_jacobian_operator='J'"),
    ],
)
def test_bad_registration_raises(kwargs: dict, match: str) -> None:
    args = dict(cls=TanhTop1MoE, gates=top1_gates, expert=tanh_expert, num_experts=E) | kwargs
    cls = args.pop("cls")
    with pytest.raises(ValueError, match=re.escape(match)):
        register_moe_class(cls, **args)


def test_callable_view_probes_in_float64_whatever_module_it_is_given():
    """The probe lends float64 copies of the modules the view's functions hold, not only of ``module``: a view whose
    module is the router (or a module holding no weights) gives the same report as the block's own view."""
    from moe_lightning.adapters import CallableView
    from moe_lightning.geometry import ProbeConfig, probe

    torch.manual_seed(0)
    block = nn.ModuleDict({"router": nn.Linear(6, 3), "experts": nn.ModuleList(nn.Linear(6, 6) for _ in range(3))})
    router, experts = block["router"], block["experts"]
    x = torch.randn(12, 6)
    config = ProbeConfig(pca=False, subspaces=False)

    def view(module):
        return CallableView(
            name="moe", module=module, gates_fn=lambda t: router(t).softmax(-1), expert_fns=list(experts)
        )

    reference = probe(view(block), x, config).scalars("")
    for module in (router, nn.Identity()):
        assert probe(view(module), x, config).scalars("") == pytest.approx(reference, rel=1e-12)


def test_selection_bias_is_found_on_the_router_or_on_the_block():
    from moe_lightning.adapters import CallableView, selection_bias

    def view(module, num_experts=4):
        return CallableView(name="m", module=module, gates_fn=lambda t: t, expert_fns=[nn.Identity()] * num_experts)

    block = nn.Module()
    block.register_buffer("expert_bias", torch.arange(4.0))  # torchtitan keeps it on the MoE block
    assert torch.equal(selection_bias(view(block)), torch.arange(4.0))
    gate = nn.Module()
    gate.register_buffer("e_score_correction_bias", torch.ones(4))  # DeepSeek-V3 on its gate
    holder = nn.Module()
    holder.gate = gate
    assert torch.equal(selection_bias(view(holder)), torch.ones(4))
    assert selection_bias(view(holder, num_experts=1)) is None  # a shared expert's view has no selection bias
