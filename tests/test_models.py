"""Models: forward/backward for every routing, against references written with plain tensor ops."""

import pytest
import torch
import torch.nn.functional as F

from moe_lightning.adapters import find_moe_layers
from moe_lightning.nn.layer import DenseFFN, MoELayer
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig, TransformerMoE, TransformerMoEConfig, param_counts

ROUTINGS = ["dense", "topk", "soft"]
SMALL = {"dim": 16, "expert_hidden": 16, "num_experts": 4, "top_k": 2}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_mlp_moe_matches_manual_composition(routing):
    torch.manual_seed(0)
    model = MLPMoE(MLPMoEConfig(input_dim=6, output_dim=3, num_blocks=2, routing=routing, **SMALL)).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = model(x)
    h = x @ model.input_proj.weight.T + model.input_proj.bias
    for block in model.blocks:
        z = F.layer_norm(h, (16,), block.norm.weight, block.norm.bias)
        ffn = block.ffn
        gates = torch.ones(5, 1, dtype=torch.float64) if isinstance(ffn, DenseFFN) else ffn.router.gates(z)
        h = h + sum(gates[:, e : e + 1] * ffn.expert_fn(e, z) for e in range(ffn.num_experts))
    expected = model.head(F.layer_norm(h, (16,), model.norm.weight, model.norm.bias))
    torch.testing.assert_close(out.output, expected, rtol=1e-10, atol=1e-12)
    # backward reaches every parameter that took part (routers and experts included)
    (out.output.square().sum() + sum(out.aux_losses().values())).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(out.aux) == (0 if routing == "dense" else 2)


def reference_causal_attention(attn, x):
    B, T, D = x.shape
    heads = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)
    q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (D // heads) ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, D) @ attn.proj.weight.T


@pytest.mark.parametrize("routing", ROUTINGS)
def test_transformer_forward_backward_and_causality(routing):
    torch.manual_seed(1)
    cfg = TransformerMoEConfig(vocab_size=40, num_layers=2, num_heads=2, max_seq_len=16, routing=routing, **SMALL)
    model = TransformerMoE(cfg).double()
    tokens = torch.randint(0, 40, (2, 9))
    out = model(tokens)
    assert out.output.shape == (2, 9, 40)
    # reference forward of block 0's attention
    block = model.blocks[0]
    h = model.token_embedding(tokens) + model.position_embedding(torch.arange(9))
    torch.testing.assert_close(
        block.attn(block.attn_norm(h)), reference_causal_attention(block.attn, block.attn_norm(h))
    )
    # causal: changing the last token leaves earlier logits unchanged
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 40
    torch.testing.assert_close(model(changed).output[:, :-1], out.output[:, :-1])
    # tied embeddings
    assert model.head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    F.cross_entropy(out.output.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_every_and_layer_discovery():
    cfg = TransformerMoEConfig(vocab_size=20, num_layers=4, num_heads=2, moe_every=2, **SMALL)
    model = TransformerMoE(cfg)
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    views = find_moe_layers(model)
    assert [v.name for v in views] == [f"blocks.{i}.ffn" for i in range(4)]
    assert [v.num_experts for v in views] == [1, 4, 1, 4]
    assert [v.name for v in find_moe_layers(model, layers="blocks.[13].ffn")] == ["blocks.1.ffn", "blocks.3.ffn"]


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_view_reconstructs_layer_output(routing):
    torch.manual_seed(2)
    model = MLPMoE(MLPMoEConfig(input_dim=6, output_dim=3, routing=routing, **SMALL)).double()
    (view,) = find_moe_layers(model)
    x = torch.randn(7, 16, dtype=torch.float64)
    gates = view.gates(x)
    rebuilt = sum(gates[:, e : e + 1] * view.expert(e)(x) for e in range(view.num_experts))
    torch.testing.assert_close(rebuilt, view.module(x)[0], rtol=1e-12, atol=1e-12)


def test_param_counts_total_and_active():
    cfg = MLPMoEConfig(input_dim=6, output_dim=3, routing="topk", **SMALL)
    model = MLPMoE(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = 4 * (16 * 16 + 16 * 16)
    counts = param_counts(model)
    assert counts == {"total": total, "active": total - experts // 2}
    dense = MLPMoE(MLPMoEConfig(input_dim=6, output_dim=3, routing="dense", **SMALL))
    # matched total capacity: the dense model differs only by the router's D*E weights
    assert param_counts(dense)["total"] == total - 16 * 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 15, "num_heads": 2}, "divisible by num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": -3}, "vocab_size"),
    ],
)
def test_transformer_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerMoEConfig(**{**SMALL, **kwargs})


def test_sequence_longer_than_max_raises():
    model = TransformerMoE(TransformerMoEConfig(vocab_size=20, num_heads=2, max_seq_len=4, **SMALL))
    with pytest.raises(ValueError, match="max_seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
