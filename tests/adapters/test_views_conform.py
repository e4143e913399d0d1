"""Every view class the adapters define conforms to the MoEView protocol, and offers the optional members it says
it does."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from moe_lightning.adapters import (
    base,
    custom,
    find_moe_layers,
    hf,
    hf_experts,
    hf_experts_views,
    native,
    registered_adapters,
)
from moe_lightning.geometry.view import HasJacobianOperator, HasPlacement, MoEView, check_view
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

transformers = pytest.importorskip("transformers")

from helpers import tiny_hf_model  # noqa: E402

NATIVE = dict(
    input_dim=6, output_dim=3, dim=8, expert_hidden=8, num_experts=4, top_k=2, num_blocks=1,
    num_shared_experts=1, shared_expert_hidden=4, activation="swiglu",
)  # fmt: skip
QWEN2_MOE = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=16,
    shared_expert_intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def view_classes() -> set[type]:
    """The classes the adapter modules define whose names end in View."""
    return {
        cls
        for module in (base, custom, hf, hf_experts, hf_experts_views, native)
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and name.endswith("View") and cls.__module__ == module.__name__
    }


def built_in_views() -> list:
    """One view of every built-in class, on tiny models."""
    if "hf-experts" not in registered_adapters():
        hf.register_hf_adapters()
    views = find_moe_layers(MLPMoE(MLPMoEConfig(**NATIVE)))  # routed and shared experts
    qwen = find_moe_layers(tiny_hf_model("qwen2_moe", **QWEN2_MOE))  # experts interface, routed and shared
    views += qwen
    # the transformers 4.x layout's views read the same blocks
    views += [hf.HFSparseMoeView(qwen[0].name, qwen[0].module), hf.HFSharedExpertView(qwen[1].name, qwen[1].module)]
    router = nn.Linear(4, 2)
    experts = [nn.Linear(4, 4), nn.Linear(4, 4)]
    views.append(base.CallableView("mine", router, gates_fn=lambda x: router(x).softmax(-1), expert_fns=experts))
    return views


def test_every_built_in_view_conforms():
    views = built_in_views()
    assert {type(v) for v in views} == view_classes()  # a new view class must be added here
    x = torch.randn(3, 8, dtype=torch.float32)
    for view in views:
        assert isinstance(view, MoEView), type(view).__name__
        assert check_view(view, "test") is view
        assert isinstance(view, HasJacobianOperator), type(view).__name__
        native_view = isinstance(view, native.NativeMoEView)
        assert isinstance(view, HasPlacement) == native_view, type(view).__name__
        if native_view:  # no expert parallelism: every rank holds every expert
            assert view.placement() is None
            assert view.gates(x).shape == (3, view.num_experts)
