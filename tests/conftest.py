"""Fixtures shared by the test files: factories for tiny models, so each test states only the sizes it needs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import tiny_hf_model as _tiny_hf_model

from moe_lightning.moe import MoEConfig, MoELayer


@pytest.fixture
def tiny_moe_layer() -> Callable[..., MoELayer]:
    """``make(**fields)``: a float64 :class:`MoELayer` (D=8, H=16, E=4, top-2 by default), weights from seed 0."""

    def make(seed: int = 0, **fields) -> MoELayer:
        torch.manual_seed(seed)
        config = MoEConfig(**{"dim": 8, "expert_hidden": 16, "num_experts": 4, "top_k": 2, **fields})
        return MoELayer(config).double().eval()

    return make


@pytest.fixture
def tiny_hf_model() -> Callable[..., torch.nn.Module]:
    """``make(family, **config)``: a random Hugging Face MoE causal LM (skipped without transformers)."""
    pytest.importorskip("transformers")
    return _tiny_hf_model
