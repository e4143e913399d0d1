"""MoE layers against references computed here with plain tensor ops (a per-token Python loop)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lightning.nn.layer import DenseFFN, MoEConfig, MoELayer, build_ffn, load_balance_loss, router_z_loss

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def reference_moe(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k (renormalised) or soft gates, each expert's MLP written out."""
    cfg = layer.config
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        probs = torch.exp(layer.router.weight @ x_ND[n])
        probs = probs / probs.sum()
        if cfg.routing == "soft":
            chosen = {e: probs[e] for e in range(cfg.num_experts)}
        else:
            top = sorted(range(cfg.num_experts), key=lambda e: -probs[e].item())[: cfg.top_k]
            norm = sum(probs[e] for e in top) if cfg.normalize_topk else 1.0
            chosen = {e: probs[e] / norm for e in top}
        for e, g in chosen.items():
            h = x_ND[n] @ layer.w_in[e]
            if cfg.activation == "swiglu":
                H = cfg.expert_hidden
                h = F.silu(h[:H]) * h[H:]
            else:
                h = ACTS[cfg.activation](h)
            out[n] += g * (h @ layer.w_out[e])
    return out


@pytest.mark.parametrize("routing", ["topk", "soft"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_forward_matches_per_token_reference(routing, activation, normalize):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=8,
        expert_hidden=12,
        num_experts=4,
        top_k=2,
        routing=routing,
        activation=activation,
        normalize_topk=normalize,
        dispatch="loop",
    )
    layer = MoELayer(cfg).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(y.reshape(-1, 8), reference_moe(layer, x.reshape(-1, 8)), rtol=1e-12, atol=1e-12)
    assert aux.tokens_per_expert.sum().item() == 10 * (2 if routing == "topk" else 4)


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_backward_matches_reference(routing, tiny_moe_layer):
    layer = tiny_moe_layer(seed=1, expert_hidden=8, routing=routing)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(layer(x)[0].square().sum(), [x, layer.w_in, layer.router.weight])
    reference = torch.autograd.grad(reference_moe(layer, x).square().sum(), [x, layer.w_in, layer.router.weight])
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_topk_gates_sum_to_one_over_exactly_k():
    torch.manual_seed(2)
    layer = MoELayer(MoEConfig(dim=16, expert_hidden=8, num_experts=6, top_k=3))
    route = layer.router(torch.randn(50, 16))
    assert ((route.gates > 0).sum(-1) == 3).all()
    torch.testing.assert_close(route.gates.sum(-1), torch.ones(50))
    # the kept experts are the 3 most probable ones
    kept = route.gates > 0
    assert (route.probs[kept].reshape(50, 3).min(-1).values >= route.probs[~kept].reshape(50, 3).max(-1).values).all()


def test_soft_gates_are_the_softmax():
    torch.manual_seed(3)
    layer = MoELayer(MoEConfig(dim=16, expert_hidden=8, num_experts=5, routing="soft"))
    x = torch.randn(20, 16)
    gates = layer.router.gates(x)
    torch.testing.assert_close(gates, torch.softmax(x @ layer.router.weight.T, -1))
    torch.testing.assert_close(gates.sum(-1), torch.ones(20))


def test_load_balance_is_one_at_perfect_balance_and_larger_otherwise():
    E = 4
    uniform = torch.full((12, E), 1 / E)
    assert load_balance_loss(uniform, torch.full((E,), 3)).item() == pytest.approx(1.0, abs=1e-12)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(12, 1)
    skewed_counts = torch.tensor([12, 0, 0, 0])
    # hand-computed: E * sum_i f_i P_i = 4 * (1.0 * 0.7) = 2.8
    assert load_balance_loss(skewed_probs, skewed_counts).item() == pytest.approx(2.8, rel=1e-6)


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4; z = mean of their squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_capacity_drops_in_token_order_and_reports_count():
    torch.manual_seed(4)
    cfg = MoEConfig(dim=8, expert_hidden=8, num_experts=2, top_k=1, capacity_factor=0.5, dispatch="loop")
    layer = MoELayer(cfg).double()
    with torch.no_grad():  # route every token to expert 0
        layer.router.weight.copy_(torch.tensor([[10.0] * 8, [-10.0] * 8]))
    x = torch.rand(8, 8, dtype=torch.float64) + 0.1
    y, aux = layer(x)
    capacity = math.ceil(0.5 * 8 * 1 / 2)  # 2 tokens
    assert aux.dropped.item() == 8 - capacity
    assert aux.tokens_per_expert.tolist() == [capacity, 0]
    kept = reference_moe(layer, x[:capacity])
    torch.testing.assert_close(y[:capacity], kept)
    assert (y[capacity:] == 0).all()


def test_dropless_reports_zero_drops(tiny_moe_layer):
    layer = tiny_moe_layer(expert_hidden=8)
    assert layer(torch.randn(9, 8, dtype=torch.float64))[1].dropped.item() == 0


@pytest.mark.parametrize("capacity_match,hidden", [("total", 4 * 16), ("active", 2 * 16)])
def test_dense_capacity_matching(capacity_match, hidden):
    moe_cfg = MoEConfig(dim=8, expert_hidden=16, num_experts=4, top_k=2, routing="topk")
    dense_cfg = MoEConfig(
        dim=8, expert_hidden=16, num_experts=4, top_k=2, routing="dense", capacity_match=capacity_match
    )
    dense, moe = build_ffn(dense_cfg), build_ffn(moe_cfg)
    assert isinstance(dense, DenseFFN) and dense.hidden == hidden
    dense_params = sum(p.numel() for p in dense.parameters())
    moe_expert_params = moe.w_in.numel() + moe.w_out.numel()
    assert dense_params == 2 * 8 * hidden
    if capacity_match == "total":
        assert dense_params == moe_expert_params  # equal total parameters (router aside)
    else:
        assert dense_params == moe_expert_params * 2 // 4  # equal active parameters per token
    assert dense_cfg.param_counts() == {"total": dense_params, "active": dense_params}
    assert moe_cfg.param_counts() == {"total": moe_expert_params + 8 * 4, "active": moe_expert_params // 2 + 8 * 4}


def test_dense_ffn_matches_plain_mlp():
    torch.manual_seed(5)
    dense = DenseFFN(MoEConfig(dim=8, expert_hidden=4, num_experts=2, routing="dense")).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(dense(x)[0], F.gelu(x @ dense.w_in[0]) @ dense.w_out[0])


def test_jitter_only_in_training():
    torch.manual_seed(6)
    layer = MoELayer(MoEConfig(dim=8, expert_hidden=8, num_experts=4, jitter_noise=0.5))
    x = torch.randn(20, 8)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    torch.testing.assert_close(layer(x)[1].router.gates, layer.router.gates(x))
    layer.train()
    assert not torch.equal(layer(x)[1].router.logits, layer(x)[1].router.logits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"routing": "hash"}, "routing='hash'.*'dense', 'topk', 'soft'"),
        ({"activation": "tanhh"}, "activation"),
        ({"dim": 0}, "dim must be positive"),
        ({"expert_hidden": -1}, "expert_hidden must be positive"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_match": "half"}, "capacity_match"),
        ({"dispatch": "fast"}, "dispatch"),
    ],
)
def test_bad_config_raises_clear_value_error(kwargs, match):
    base = {"dim": 8, "expert_hidden": 8, "num_experts": 4, "top_k": 2}
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **kwargs})


def test_wrong_input_dim_raises():
    layer = MoELayer(MoEConfig(dim=8, expert_hidden=8, num_experts=4))
    with pytest.raises(ValueError, match="last dim 8"):
        layer(torch.randn(3, 7))


def test_soft_load_balance_is_gate_mass_based():
    torch.manual_seed(7)
    layer = MoELayer(MoEConfig(dim=8, expert_hidden=8, num_experts=4, routing="soft"))
    x = torch.randn(30, 8)
    aux = layer(x)[1]
    mean_probs = torch.softmax(x @ layer.router.weight.T, -1).mean(0)
    torch.testing.assert_close(aux.load_balance, 4 * mean_probs.square().sum())
    assert aux.load_balance.item() > 1.0


def test_state_dict_keys_are_those_checkpoints_hold():
    """Sharded checkpoints (torch.distributed.checkpoint) and their optimizer states are keyed by parameter name, and
    a ``load_state_dict`` hook cannot rename keys there: the layer's names stay those 0.1 saved."""
    config = MoEConfig(dim=8, expert_hidden=8, num_experts=4, load_balancing="aux_free", num_shared_experts=1)
    assert list(MoELayer(config).state_dict()) == [
        "w_in",
        "w_out",
        "router.weight",
        "router.expert_bias",
        "shared_experts.w_in",
        "shared_experts.w_out",
    ]
    assert list(DenseFFN(MoEConfig(dim=8, routing="dense")).state_dict()) == ["w_in", "w_out"]
