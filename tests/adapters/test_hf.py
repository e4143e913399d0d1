"""Hugging Face adapters: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models, no download.

Every check compares the view with the HF block itself: its router's own outputs (captured by a forward hook),
the router logits the model returns (turned into weights with plain softmax/topk here), its forward output, and
autograd Jacobians of its forward.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import tiny_hf_model  # noqa: E402

from moe_lightning.adapters import find_moe_layers, registered_adapters  # noqa: E402
from moe_lightning.adapters.hf import HFSharedExpertView, HFSparseMoeView, register_hf_adapters  # noqa: E402
from moe_lightning.adapters.hf_experts_views import ExpertsInterfaceView  # noqa: E402
from moe_lightning.geometry import MoEView  # noqa: E402

HF_ADAPTERS = ["hf-experts", "hf-mixtral", "hf-qwen2-moe", "hf-qwen3-moe", "hf-olmoe"]
D = 32  # hidden size of every tiny model
# Large init, so that layer outputs are O(1) and the absolute tolerances below mean something.
COMMON = dict(
    vocab_size=100,
    hidden_size=D,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# family -> (extra config, top-k renormalised?)
FAMILIES = {
    "mixtral": (dict(num_local_experts=4), True),
    "qwen2_moe": (
        dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=48, norm_topk_prob=False),
        False,
    ),
    "qwen3_moe": (dict(num_experts=4, moe_intermediate_size=16), True),
    "olmoe": (dict(num_experts=4, norm_topk_prob=False), False),
}
EXTRA = {"qwen3_moe": dict(norm_topk_prob=True)}
# the routed-experts views: the experts-interface adapter's (transformers 5) and the family adapters' (4.x layout)
ROUTED = (ExpertsInterfaceView, HFSparseMoeView)


@pytest.fixture(autouse=True)
def _hf_adapters_registered() -> None:
    if not set(HF_ADAPTERS) <= set(registered_adapters()):
        register_hf_adapters()


def build(family: str, **overrides) -> torch.nn.Module:
    extra, _ = FAMILIES[family]
    return tiny_hf_model(family, **{**COMMON, **extra, **EXTRA.get(family, {}), **overrides}).eval()


def block_forward(block: torch.nn.Module, x_ND: torch.Tensor) -> torch.Tensor:
    """The block's own forward on (N, D) tokens: HF blocks take (B, T, D); 4.x blocks return a tuple."""
    out = block(x_ND.reshape(1, -1, x_ND.shape[-1]))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x_ND.shape)


def run_and_capture(model: torch.nn.Module, views: list[MoEView]):
    """Run the model once; return its output and, per block, the captured input, output and router returns."""
    blocks = {id(v.module): v.module for v in views}
    captured: dict[int, dict[str, object]] = {key: {} for key in blocks}
    handles = []
    for key, block in blocks.items():

        def block_hook(module, args, output, key=key):
            captured[key]["x"] = args[0].detach().reshape(-1, D)
            out = output[0] if isinstance(output, tuple) else output
            captured[key]["y"] = out.detach().reshape(-1, D)

        def router_hook(module, args, output, key=key):
            captured[key]["router"] = tuple(t.detach() for t in output)

        handles.append(block.register_forward_hook(block_hook))
        handles.append(block.gate.register_forward_hook(router_hook))
    torch.manual_seed(1)
    input_ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    for handle in handles:
        handle.remove()
    return out, captured


def views_of_block(views: list[MoEView], block: torch.nn.Module) -> list[MoEView]:
    return [v for v in views if v.module is block]


def test_register_is_idempotent() -> None:
    register_hf_adapters()
    register_hf_adapters()
    names = registered_adapters()
    assert all(names.count(name) == 1 for name in HF_ADAPTERS)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("mixtral", ["model.layers.0.mlp", "model.layers.1.mlp"]),
        (
            "qwen2_moe",
            [
                "model.layers.0.mlp",
                "model.layers.0.mlp.shared_expert",
                "model.layers.1.mlp",
                "model.layers.1.mlp.shared_expert",
            ],
        ),
        ("qwen3_moe", ["model.layers.0.mlp", "model.layers.1.mlp"]),
        ("olmoe", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    ],
)
def test_layers_found(family: str, expected: list[str]) -> None:
    model = build(family)
    views = find_moe_layers(model)
    assert [v.name for v in views] == expected
    for view in views:
        assert isinstance(view, MoEView)
        block = model.get_submodule(view.name.removesuffix(".shared_expert"))
        assert view.module is block
        assert view.num_experts == (1 if view.name.endswith("shared_expert") else 4)
    assert [v.name for v in find_moe_layers(model, layers="*.1.mlp*")] == [n for n in expected if ".1." in n]


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_dense_layers_are_skipped(family: str) -> None:
    # mlp_only_layers makes layer 0 a dense Qwen*MoeMLP, which is not an MoE block.
    model = build(family, mlp_only_layers=[0])
    names = [v.name for v in find_moe_layers(model)]
    assert names == ["model.layers.1.mlp"] + (["model.layers.1.mlp.shared_expert"] if family == "qwen2_moe" else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gates_equal_model_router_weights(family: str) -> None:
    model = build(family)
    views = find_moe_layers(model)
    out, captured = run_and_capture(model, views)
    renormalise = FAMILIES[family][1]
    routed = [v for v in views if isinstance(v, ROUTED)]
    assert len(routed) == len(out.router_logits) == 2
    for view, logits_NE in zip(routed, out.router_logits, strict=True):
        cap = captured[id(view.module)]
        gates_NE = view.gates(cap["x"])
        assert gates_NE.shape == (12, 4)
        # Reference 1: the weights and indices the HF router module itself returned.
        _, scores_NK, index_NK = cap["router"]
        own_NE = torch.zeros(12, 4).scatter(-1, index_NK, scores_NK.float())
        torch.testing.assert_close(gates_NE, own_NE, rtol=1e-6, atol=1e-7)
        # Reference 2: the router logits the model returns, through plain softmax / top-k.
        probs_NE = torch.softmax(logits_NE.double(), dim=-1)
        top_NK, idx_NK = torch.topk(probs_NE, 2, dim=-1)
        if renormalise:
            top_NK = top_NK / top_NK.sum(-1, keepdim=True)
        ref_NE = torch.zeros_like(probs_NE).scatter(-1, idx_NK, top_NK)
        torch.testing.assert_close(gates_NE.double(), ref_NE, rtol=1e-5, atol=1e-6)
        assert ((gates_NE > 0).sum(-1) == 2).all()
        expected_sum = torch.ones(12) if renormalise else top_NK.sum(-1).float()
        torch.testing.assert_close(gates_NE.sum(-1), expected_sum, rtol=1e-5, atol=1e-6)
    for view in views:
        if not isinstance(view, ROUTED):  # Qwen2-MoE shared expert: sigmoid of its gate's logit
            x_ND = captured[id(view.module)]["x"]
            ref_N1 = 1 / (1 + torch.exp(-(x_ND.double() @ view.module.shared_expert_gate.weight.double().T)))
            torch.testing.assert_close(view.gates(x_ND).double(), ref_N1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reconstruction_equals_block_output(family: str, dtype: torch.dtype) -> None:
    model = build(family).to(dtype)
    if dtype == torch.float64:  # the default grouped_mm experts kernel rejects float64 on CPU
        model.set_experts_implementation("eager")
    views = find_moe_layers(model)
    _, captured = run_and_capture(model, views)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    blocks = {id(v.module): v.module for v in views}
    for key, block in blocks.items():
        x_ND, y_ND = captured[key]["x"], captured[key]["y"]
        with torch.no_grad():
            recon_ND = sum(
                view.gates(x_ND)[:, e : e + 1] * view.expert(e)(x_ND)
                for view in views_of_block(views, block)
                for e in range(view.num_experts)
            )
        assert recon_ND.dtype == dtype
        assert y_ND.abs().max() > 0.1  # outputs are O(1), so the absolute tolerance is a real test
        torch.testing.assert_close(recon_ND, y_ND, rtol=tol, atol=tol)
        torch.testing.assert_close(recon_ND, block_forward(block, x_ND).detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_hidden_and_jacobian(family: str) -> None:
    model = build(family)
    views = find_moe_layers(model)
    _, captured = run_and_capture(model, views)
    try:
        from moe_lightning.geometry.jacobians import swiglu_expert_jacobian  # noqa: F401

        has_closed_form = True
    except ImportError:
        has_closed_form = False
    for view in views:
        x_ND = captured[id(view.module)]["x"][:3]
        for e in range(view.num_experts):
            # expert = down projection of expert_hidden (the down weight is read from the HF module directly)
            if isinstance(view, ROUTED):
                w_down_DH = view.module.experts.down_proj[e]
            else:
                w_down_DH = view.module.shared_expert.down_proj.weight
            with torch.no_grad():
                torch.testing.assert_close(view.expert_hidden(e)(x_ND) @ w_down_DH.T, view.expert(e)(x_ND))
            jac_NDD = view.expert_jacobian(e, x_ND)
            if not has_closed_form:
                assert jac_NDD is None
                continue
            ref_NDD = torch.stack(
                [
                    torch.autograd.functional.jacobian(lambda x: view.expert(e)(x[None])[0], x_ND[n], vectorize=True)
                    for n in range(3)
                ]
            )
            torch.testing.assert_close(jac_NDD, ref_NDD, rtol=1e-5, atol=1e-5)
            # the matrix-free path's closed-form products: J V and Jᵀ U without forming J
            op = view.expert_jacobian_operator(e, x_ND)
            V_NDK = torch.randn(3, D, 2, generator=torch.Generator().manual_seed(e))
            torch.testing.assert_close(op.apply(V_NDK), ref_NDD @ V_NDK, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(op.apply_transpose(V_NDK), ref_NDD.mT @ V_NDK, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jacrev_through_views_matches_block_jacobian(family: str) -> None:
    model = build(family)
    views = find_moe_layers(model)
    _, captured = run_and_capture(model, views)
    block = views[0].module
    block_views = views_of_block(views, block)
    x_ND = captured[id(block)]["x"][:4]

    def layer(x_D: torch.Tensor) -> torch.Tensor:
        x_1D = x_D[None]
        return sum(
            view.gates(x_1D)[0, e] * view.expert(e)(x_1D)[0] for view in block_views for e in range(view.num_experts)
        )

    # vmap over tokens of jacrev through gates (softmax, top-k, scatter) and experts: must be functorch-friendly.
    jac_NDD = torch.func.vmap(torch.func.jacrev(layer))(x_ND)
    assert jac_NDD.shape == (4, D, D)
    for n in range(4):
        ref_DD = torch.autograd.functional.jacobian(lambda x: block_forward(block, x[None])[0], x_ND[n])
        assert ref_DD.abs().max() > 0.1
        torch.testing.assert_close(jac_NDD[n], ref_DD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_interface_adapter_equals_the_family_adapter(family: str) -> None:
    # transformers 5 blocks of the four families are now read by the experts-interface adapter; the family adapter
    # (kept for the 4.x layout) still reads them, and both must give the same gates, experts and Jacobians
    model = build(family)
    views = find_moe_layers(model)
    _, captured = run_and_capture(model, views)
    for view in views:
        x_ND = captured[id(view.module)]["x"][:5]
        if isinstance(view, ExpertsInterfaceView):
            old = HFSparseMoeView(view.name, view.module, always_normalise=family == "mixtral")
        else:
            old = HFSharedExpertView(view.name, view.module)
        with torch.no_grad():
            torch.testing.assert_close(view.gates(x_ND), old.gates(x_ND), rtol=1e-6, atol=1e-7)
            for e in range(view.num_experts):
                torch.testing.assert_close(view.expert(e)(x_ND), old.expert(e)(x_ND), rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(view.expert_hidden(e)(x_ND), old.expert_hidden(e)(x_ND))
                torch.testing.assert_close(view.expert_jacobian(e, x_ND), old.expert_jacobian(e, x_ND))


def test_non_silu_activation_has_no_closed_form_jacobian() -> None:
    model = build("mixtral", hidden_act="gelu")
    views = find_moe_layers(model)
    _, captured = run_and_capture(model, views)
    view = views[0]
    x_ND = captured[id(view.module)]["x"]
    assert view.expert_jacobian(0, x_ND) is None
    assert view.expert_jacobian_operator(0, x_ND) is None
    with torch.no_grad():  # the expert still follows the block's own activation
        recon_ND = sum(view.gates(x_ND)[:, e : e + 1] * view.expert(e)(x_ND) for e in range(4))
    torch.testing.assert_close(recon_ND, captured[id(view.module)]["y"], rtol=1e-5, atol=1e-5)


def test_bad_expert_index_raises() -> None:
    views = find_moe_layers(build("qwen2_moe"))
    with pytest.raises(ValueError, match="e=4"):
        views[0].expert(4)
    with pytest.raises(ValueError, match="e=1"):
        views[1].expert_hidden(1)


def test_hf_module_does_not_import_transformers() -> None:
    code = "import sys, moe_lightning.adapters.hf; assert 'transformers' not in sys.modules, 'imported'"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr


# --- transformers 4.x layout: nn.Linear router, nn.ModuleList of SwiGLU experts, blocks returning a tuple. ---
# A stand-in written after the 4.x modeling files (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock), so the
# adapter's legacy path is checked without installing an old transformers. Matching is by class name.
class _SwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, mixtral_names: bool) -> None:
        super().__init__()
        names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
        self.names = names
        for name, shape in zip(names, [(D, hidden), (D, hidden), (hidden, D)], strict=True):
            setattr(self, name, torch.nn.Linear(*shape, bias=False))
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class _Legacy4xBlock(torch.nn.Module):
    def __init__(self, mixtral: bool, norm_topk_prob: bool = False) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob, self.mixtral = 2, norm_topk_prob, mixtral
        self.gate = torch.nn.Linear(D, 4, bias=False)
        self.experts = torch.nn.ModuleList(_SwiGLU(16, mixtral) for _ in range(4))
        if not mixtral:
            self.shared_expert = _SwiGLU(24, False)
            self.shared_expert_gate = torch.nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, dim)
        router_logits = self.gate(hidden_states)
        routing_weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.mixtral or self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = torch.nn.functional.one_hot(selected, num_classes=4).permute(2, 1, 0)
        for expert_idx in range(4):
            idx, top_x = torch.where(expert_mask[expert_idx])
            out = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out)
        if not self.mixtral:
            final = final + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return final.reshape(batch, seq, dim), router_logits


class MixtralSparseMoeBlock(_Legacy4xBlock):
    def __init__(self) -> None:
        super().__init__(mixtral=True)


class Qwen2MoeSparseMoeBlock(_Legacy4xBlock):
    def __init__(self, norm_topk_prob: bool) -> None:
        super().__init__(mixtral=False, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("make_block", [MixtralSparseMoeBlock, lambda: Qwen2MoeSparseMoeBlock(True)])
def test_transformers_4x_layout(make_block) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), make_block())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    views = find_moe_layers(model)
    assert [v.name for v in views] == (
        ["1"] if isinstance(model[1], MixtralSparseMoeBlock) else ["1", "1.shared_expert"]
    )
    block = model[1]
    x_ND = torch.randn(10, D)
    with torch.no_grad():
        y_ND, logits_NE = block(x_ND[None])
        recon_ND = sum(v.gates(x_ND)[:, e : e + 1] * v.expert(e)(x_ND) for v in views for e in range(v.num_experts))
        # the views cast what they read: float64 tokens on the float32 block, with nothing lent
        x64 = x_ND.double()
        recon64_ND = sum(v.gates(x64)[:, e : e + 1] * v.expert(e)(x64) for v in views for e in range(v.num_experts))
    torch.testing.assert_close(recon_ND, y_ND[0], rtol=1e-5, atol=1e-5)
    assert all(v.casts_weights_on_read() for v in views) and recon64_ND.dtype == torch.float64
    torch.testing.assert_close(recon64_ND, y_ND[0].double(), rtol=1e-5, atol=1e-5)
    top_NK, idx_NK = torch.softmax(logits_NE, -1).topk(2, dim=-1)  # both blocks renormalise here
    ref_NE = torch.zeros(10, 4).scatter(-1, idx_NK, top_NK / top_NK.sum(-1, keepdim=True))
    torch.testing.assert_close(views[0].gates(x_ND), ref_NE, rtol=1e-6, atol=1e-7)
    jac_NDD = torch.func.vmap(
        torch.func.jacrev(
            lambda x: sum(v.gates(x[None])[0, e] * v.expert(e)(x[None])[0] for v in views for e in range(v.num_experts))
        )
    )(x_ND[:2])
    for n in range(2):
        ref_DD = torch.autograd.functional.jacobian(lambda x: block(x.view(1, 1, D))[0].view(D), x_ND[n])
        torch.testing.assert_close(jac_NDD[n], ref_DD, rtol=1e-5, atol=1e-5)
