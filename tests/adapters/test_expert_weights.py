"""``expert_weights(e)`` (the optional ``HasExpertWeights`` member) of every view that offers it names each matrix by
its role: the expert rebuilt from the matrices it returns (``w_gate``, ``w_up``, ``w_in``, ``w_out``) is the view's
own expert; and the matrices are the parameters themselves, not copies.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_lightning.adapters import StackedExperts, find_moe_layers, hf, register_moe, registered_adapters
from moe_lightning.geometry import HasExpertWeights
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig

transformers = pytest.importorskip("transformers")

from helpers import tiny_hf_model  # noqa: E402

D = 8
NATIVE = dict(
    input_dim=6, output_dim=3, dim=D, expert_hidden=12, num_experts=4, top_k=2, num_blocks=1,
    num_shared_experts=1, shared_expert_hidden=4,
)  # fmt: skip
HF_D = 32  # grouped_mm needs 16-byte aligned rows
QWEN2_MOE = dict(
    vocab_size=100, hidden_size=HF_D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=16,
    shared_expert_intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def oriented(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` with ``rows`` rows: the matrices come in whatever layout the module keeps (D differs from every H)."""
    return w if w.shape[0] == rows else w.T


def rebuilt(matrices: dict[str, torch.Tensor], activation, x_ND: torch.Tensor) -> torch.Tensor:
    """The expert from its named matrices: ``(act(x W_gate) * (x W_up)) W_out`` or ``act(x W_in) W_out``."""
    w = {name: m.to(x_ND.dtype) for name, m in matrices.items()}
    dim = x_ND.shape[1]
    if "w_gate" in w:
        hidden = F.silu(x_ND @ oriented(w["w_gate"], dim)) * (x_ND @ oriented(w["w_up"], dim))
    else:
        hidden = activation(x_ND @ oriented(w["w_in"], dim))
    out = oriented(w["w_out"], hidden.shape[1])
    return hidden @ out


def check_views(views, activation=F.silu, dim: int = D, dtype=torch.float64) -> int:
    """Check every expert of ``views``, whose modules are in ``dtype``; returns how many."""
    x_ND = torch.randn(5, dim, dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    checked = 0
    for view in views:
        assert isinstance(view, HasExpertWeights), type(view).__name__
        for e in range(view.num_experts):
            matrices = view.expert_weights(e)
            assert matrices is not None and set(matrices) in ({"w_gate", "w_up", "w_out"}, {"w_in", "w_out"})
            torch.testing.assert_close(
                rebuilt(matrices, activation, x_ND), view.expert(e)(x_ND), rtol=tolerance, atol=tolerance
            )
            parameters = list(view.module.parameters())
            for m in matrices.values():  # a view of a parameter's storage: nothing was copied
                assert any(m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in parameters)
            checked += 1
    return checked


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_native_routed_and_shared_experts(activation) -> None:
    torch.manual_seed(0)
    views = find_moe_layers(MLPMoE(MLPMoEConfig(**NATIVE, activation=activation)).double())
    assert [v.num_experts for v in views] == [4, 1]
    assert check_views(views, F.gelu) == 5


def test_hugging_face_experts_interface_and_the_4x_layout() -> None:
    if "hf-experts" not in registered_adapters():
        hf.register_hf_adapters()
    model = tiny_hf_model("qwen2_moe", **QWEN2_MOE)  # float32: its grouped_mm takes no float64
    views = find_moe_layers(model)  # routed experts (gate_up_proj, down_proj) and the shared expert
    assert check_views(views, dim=HF_D, dtype=torch.float32) == 5
    # the transformers 4.x layout's views read the same blocks
    legacy = [hf.HFSparseMoeView(views[0].name, views[0].module), hf.HFSharedExpertView(views[1].name, views[1].module)]
    for old, new in zip(legacy, views, strict=True):
        for e in range(new.num_experts):
            for name, matrix in new.expert_weights(e).items():
                assert torch.equal(oriented(old.expert_weights(e)[name], matrix.shape[0]), matrix)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("gated", [True, False])
def test_declared_stacked_experts(layout, gated) -> None:
    E, H = 3, 10

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            shape = (E, D, H) if layout == "in_out" else (E, H, D)
            self.w_up, self.w_gate = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape))
            self.w_down = nn.Parameter(torch.randn(shape[0], shape[2], shape[1]))
            self.gate = nn.Linear(D, E, bias=False)

        def forward(self, x):
            return x

    register_moe(
        Layer, router="gate", top_k=1,
        experts=StackedExperts(
            w_in="w_up", w_out="w_down", w_gate="w_gate" if gated else None, layout=layout,
            activation="silu" if gated else "gelu",
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    (view,) = find_moe_layers(nn.Sequential(Layer()).double())
    assert check_views([view], F.gelu) == E
