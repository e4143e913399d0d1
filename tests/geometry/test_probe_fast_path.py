"""The probe's shortcuts against the computation they replace, on a layer of the shipped WikiText configs' size
(D = 128, 8 SwiGLU experts of H = 128, top-2): every quantity equals the one computed without the shortcut."""

import pytest
import torch
from helpers import FunctionOnlyView

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, probe, probe_statistics
from moe_lightning.geometry.accumulators import Alignment
from moe_lightning.nn.layer import MoEConfig, MoELayer

DT = torch.float64


@pytest.fixture(scope="module")
def wikitext_layer():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=128, expert_hidden=128, num_experts=8, top_k=2, activation="swiglu"))
    (view,) = find_moe_layers(layer)
    return view, torch.randn(64, 128)


def test_fast_path_equals_the_formed_jacobians_on_a_wikitext_sized_layer(wikitext_layer):
    """All parts, float64, 64 tokens: every scalar, matrix and spectrum of the probe with the shortcuts equals the
    probe that forms every expert's Jacobian at every token to 1e-10 relative (round-off of a different summation
    order), with the same keys and variants."""
    view, x = wikitext_layer
    (alignment,) = [q for q in probe_statistics(view, x[:2], ProbeConfig()).quantities if isinstance(q, Alignment)]
    assert alignment.pointwise_factored and not alignment.needs_all_token_jacobians  # the shortcut is taken
    fast = probe(view, x, ProbeConfig())
    formed = probe(FunctionOnlyView(view), x, ProbeConfig())
    a, b = formed.scalars("g"), fast.scalars("g")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-13, nan_ok=True), key
    assert formed.matrices.keys() == fast.matrices.keys() and formed.spectra.keys() == fast.spectra.keys()
    for key, M in formed.matrices.items():
        torch.testing.assert_close(fast.matrices[key], M, rtol=1e-10, atol=1e-13, equal_nan=True, msg=key)
    for key, S in formed.spectra.items():
        torch.testing.assert_close(fast.spectra[key], S, rtol=1e-10, atol=1e-13, msg=key)
    assert fast.variants == formed.variants


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_factored_pointwise_alignment_over_many_chunks_equals_the_formed_jacobians(activation):
    """A budget of a few tokens a chunk: the pointwise alignment's queued chunks run in several calls (each within the
    budget) and still equal the cosines of the formed Jacobians, token by token, summed."""
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(dim=16, expert_hidden=12, num_experts=4, top_k=2, activation=activation))
    (view,) = find_moe_layers(layer.to(DT))
    x = torch.randn(40, 16, dtype=DT)
    cfg = ProbeConfig(memory_budget_bytes=20_000, layer_jacobian=False, cka=False, pca=False, subspaces=False)
    fast, formed = probe(view, x, cfg), probe(FunctionOnlyView(view), x, cfg)
    torch.testing.assert_close(fast.matrices["align_pointwise"], formed.matrices["align_pointwise"], rtol=1e-12, atol=0)
    # an independent reference: every expert's Jacobian at every token, by the closed form
    J_NEOI = torch.stack([view.expert_jacobian(e, x) for e in range(4)], 1).flatten(2)
    cos_NEE = (J_NEOI @ J_NEOI.mT).abs() / (J_NEOI.norm(dim=-1).unsqueeze(-1) * J_NEOI.norm(dim=-1).unsqueeze(-2))
    torch.testing.assert_close(fast.matrices["align_pointwise"], cos_NEE.mean(0), rtol=1e-12, atol=1e-15)
