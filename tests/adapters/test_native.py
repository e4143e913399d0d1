"""The views of moe-lightning's own blocks: a block with shared experts is two views, routed and shared, that sum to
its output, and the shared view's closed-form Jacobian is autograd's."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, probe
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

DEEPSEEK = dict(
    input_dim=6, output_dim=3, dim=8, expert_hidden=8, num_experts=6, top_k=2, num_blocks=2, scoring="sigmoid",
    load_balancing="aux_free", num_shared_experts=2, shared_expert_hidden=4, routed_scaling=2.5,
)  # fmt: skip


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_shared_expert_views_reconstruct_the_block(activation):
    torch.manual_seed(0)
    model = MLPMoE(MLPMoEConfig(**DEEPSEEK, activation=activation)).double()
    for block in model.blocks:  # a bias that changes the selection of some tokens
        block.ffn.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.2]))
    views = find_moe_layers(model)
    assert [v.name for v in views] == [
        "blocks.0.ffn",
        "blocks.0.ffn.shared_experts",
        "blocks.1.ffn",
        "blocks.1.ffn.shared_experts",
    ]
    x = torch.randn(11, 8, dtype=torch.float64)
    for routed, shared in (views[:2], views[2:]):
        assert routed.module is shared.module and (routed.num_experts, shared.num_experts) == (6, 1)
        rebuilt = 0
        for view in (routed, shared):
            gates = view.gates(x)
            rebuilt = rebuilt + sum(gates[:, e : e + 1] * view.expert(e)(x) for e in range(view.num_experts))
        torch.testing.assert_close(rebuilt, routed.module(x)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shared.gates(x), torch.ones(11, 1, dtype=torch.float64))
        assert shared.expert_hidden(0)(x).shape == (11, 8)  # 2 shared experts x 4
        jac = torch.func.vmap(torch.func.jacrev(shared.expert(0)))(x)
        torch.testing.assert_close(shared.expert_jacobian(0, x), jac, rtol=1e-10, atol=1e-12)


def test_shared_expert_view_probes():
    torch.manual_seed(0)
    model = MLPMoE(MLPMoEConfig(**DEEPSEEK))
    shared = find_moe_layers(model, "blocks.0.ffn.shared_experts")
    assert len(shared) == 1
    report = probe(shared[0], torch.randn(64, 8), ProbeConfig())
    assert report.scalars("g")
