"""Fixtures shared by the test files: factories for tiny models, so each test states only the sizes it needs; and
the test tiers (docs/testing.md): the ``integration`` mark on tests that use a fixture which trains through the
command line, runs a sweep or runs the docs' blocks, and the skip of ``gpu`` tests without CUDA."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import tiny_hf_model as _tiny_hf_model

from moe_lightning.nn.layer import MoEConfig, MoELayer

# Fixtures that run whole commands (fits through `moe-lightning`, a sweep, every docs block): a test that uses one
# is an integration test, left out of `make test-quick`. Other heavy tests carry @pytest.mark.integration.
INTEGRATION_FIXTURES = frozenset({"logged_run", "trained_sweep", "tiny_sweep", "block_results"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch.cuda.is_available()
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if not cuda and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)"))


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
