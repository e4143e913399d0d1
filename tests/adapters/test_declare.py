"""``register_moe``: each way of declaring a layer (a logits router with its routing rule, a router's own top-k or
combine tensor, a gates function; experts as a module list or stacked weights in either layout; shared experts with
or without their gate) gives views whose gated sum is the layer's own output and whose closed-form Jacobians are
autograd's; a declaration that does not fit a layer skips it with the reason; bad arguments name the field.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``D`` model dim, ``H`` expert hidden.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_lightning.adapters import RouterOutput, StackedExperts, find_moe_layers, register_moe, scan_moe_layers
from moe_lightning.geometry import verify_view

D, H, E = 6, 10, 4


class LinearRouted(nn.Module):
    """Top-k over softmax or sigmoid scores of a linear router, a selection bias that only chooses, optional
    renormalisation and scale, module-list experts and a sigmoid-gated shared expert: each written out plainly."""

    def __init__(self, score="softmax", top_k=2, renormalize=False, scale=1.0, shared=False):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)) for _ in range(E))
        self.register_buffer("expert_bias", torch.randn(E))
        self.score, self.top_k, self.renormalize, self.scale = score, top_k, renormalize, scale
        self.shared = nn.Linear(D, D) if shared else None
        self.shared_gate = nn.Linear(D, 1) if shared else None

    def forward(self, x):
        logits = self.gate(x)
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        index = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, index)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for k in range(self.top_k):
            for e in range(E):
                chosen = (index[..., k] == e).unsqueeze(-1)
                out = out + chosen * weights[..., k : k + 1] * self.scale * self.experts[e](x)
        if self.shared is not None:
            out = out + self.shared_gate(x).sigmoid() * self.shared(x)
        return out


class Stacked(nn.Module):
    """Stacked SwiGLU or GELU experts in either layout, with a router that returns its own top-k weights and
    indices, or a GShard-style combine tensor (N, E, C)."""

    def __init__(self, layout="in_out", gated=True, combine=False):
        super().__init__()
        shape = (E, D, H) if layout == "in_out" else (E, H, D)
        self.w_up, self.w_gate = nn.Parameter(torch.randn(shape) / 3), nn.Parameter(torch.randn(shape) / 3)
        self.w_down = nn.Parameter(torch.randn(shape[0], shape[2], shape[1]) / 3)
        self.router = nn.Linear(D, E, bias=False)
        self.layout, self.gated, self.combine = layout, gated, combine

    def route(self, x_ND):
        top, index = self.router(x_ND).softmax(-1).topk(2, dim=-1)
        if not self.combine:
            return top, index
        slots = F.one_hot(index, E).to(x_ND.dtype)  # (N, K, E): each choice in a capacity slot of its own
        return None, (top.unsqueeze(-1) * slots).transpose(1, 2)  # (N, E, K) as (N, E, C)

    def expert(self, e, x_ND):
        w = {n: getattr(self, n)[e] for n in ("w_up", "w_gate", "w_down")}
        if self.layout == "out_in":
            w = {n: t.T for n, t in w.items()}
        hidden = F.silu(x_ND @ w["w_gate"]) * (x_ND @ w["w_up"]) if self.gated else F.gelu(x_ND @ w["w_up"])
        return hidden @ w["w_down"]

    def forward(self, x):
        x_ND = x.reshape(-1, D)
        routed = self.route(x_ND)
        gates_NE = (
            routed[1].sum(-1)
            if self.combine
            else torch.zeros(x_ND.shape[0], E, dtype=x.dtype).scatter(-1, routed[1], routed[0])
        )
        return sum(gates_NE[:, e : e + 1] * self.expert(e, x_ND) for e in range(E)).reshape(x.shape)


class RoutedBy(nn.Module):
    """The router half of ``Stacked``, as a module of its own (its forward is ``Stacked.route``)."""

    def __init__(self, owner):
        super().__init__()
        self.owner = [owner]  # not a child: the owner holds the weights

    def forward(self, x_ND):
        return self.owner[0].route(x_ND)


def declared_views(layer: nn.Module) -> list:
    return find_moe_layers(nn.Sequential(layer).double())


@pytest.mark.parametrize(
    "settings",
    [
        dict(score="softmax", top_k=2),
        dict(score="sigmoid", top_k=1, scale=2.5),
        dict(score="softmax", top_k=3, renormalize=True, shared=True),
    ],
)
def test_a_logits_router_declaration_reconstructs_the_layer(settings):
    class Layer(LinearRouted):
        pass

    register_moe(
        Layer,
        router="gate",
        experts="experts",
        top_k="top_k",
        score=settings["score"],
        renormalize="renormalize",
        route_scale="scale",
        selection_bias="expert_bias",
        shared_experts="shared",
        shared_gate="shared_gate",
    )
    torch.manual_seed(0)
    layer = Layer(**settings)
    views = declared_views(layer)
    assert [v.name for v in views] == (["0", "0.shared_experts"] if settings.get("shared") else ["0"])
    check = verify_view(views, torch.randn(12, D, dtype=torch.float64))
    assert check.passed and check.miss < 1e-12, check.message()
    assert torch.equal(views[0].selection_bias(), layer.expert_bias)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("combine", [False, True])
def test_stacked_experts_and_a_routers_own_output_reconstruct_and_give_autograds_jacobians(layout, gated, combine):
    class Layer(Stacked):
        def __init__(self):
            super().__init__(layout, gated, combine)
            self.routing = RoutedBy(self)

    register_moe(
        Layer,
        router=RouterOutput("routing", combine=1) if combine else RouterOutput("routing", weights=0, indices=1),
        experts=StackedExperts(
            w_in="w_up", w_out="w_down", w_gate="w_gate" if gated else None, layout=layout,
            activation="silu" if gated else "gelu",
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = Layer()
    (view,) = declared_views(layer)
    x_ND = torch.randn(9, D, dtype=torch.float64)
    check = verify_view(view, x_ND)
    assert check.passed and check.miss < 1e-12, check.message()
    for e in range(E):
        own = torch.stack([torch.autograd.functional.jacobian(lambda t: layer.expert(e, t[None])[0], x) for x in x_ND])
        torch.testing.assert_close(view.expert_jacobian(e, x_ND), own, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(view.expert(e)(x_ND), layer.expert(e, x_ND), rtol=0, atol=0)


def test_a_gates_function_declaration_and_a_later_declaration_wins():
    class Layer(LinearRouted):
        pass

    register_moe(Layer, gates=lambda m, x: torch.zeros(x.shape[0], E, dtype=x.dtype), experts="experts")
    register_moe(Layer, router="gate", experts="experts", top_k=2, selection_bias="expert_bias")
    torch.manual_seed(0)
    (view,) = declared_views(Layer())
    assert verify_view(view, torch.randn(8, D, dtype=torch.float64)).passed


def test_a_wrong_declaration_is_refused_by_the_check_and_one_that_does_not_fit_is_skipped():
    class Layer(LinearRouted):
        pass

    class Missing(LinearRouted):
        pass

    register_moe(Layer, router="gate", experts="experts", top_k=1)  # the layer routes to 2
    register_moe(Missing, router="gate", experts="no_such_experts", top_k=2)
    torch.manual_seed(0)
    (view,) = declared_views(Layer())
    check = verify_view(view, torch.randn(8, D, dtype=torch.float64))
    assert not check.passed and check.failed == "reconstruction"
    scan = scan_moe_layers(nn.Sequential(Missing()))
    (skipped,) = scan.skipped
    assert scan.views == [] and "no_such_experts" in skipped.reason and skipped.adapter == "declared"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(experts="experts"), "give router="),
        (dict(experts="experts", router="gate", gates=lambda m, x: x), "give router="),
        (dict(experts="experts", router="gate", score="relu"), "score='relu' is not allowed"),
        (dict(experts="experts", router="gate", top_k=0), "top_k=0 is not allowed"),
    ],
)
def test_bad_arguments_name_the_field(arguments, message):
    with pytest.raises(ValueError, match=message):
        register_moe(LinearRouted, **arguments)


def test_router_output_and_stacked_experts_check_their_fields():
    with pytest.raises(ValueError, match="give combine=, or both weights= and indices="):
        RouterOutput("gate", weights=0)
    with pytest.raises(ValueError, match="layout='EDH' is not allowed"):
        StackedExperts(w_in="a", w_out="b", layout="EDH")
