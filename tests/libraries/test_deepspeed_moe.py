"""DeepSpeed's ``deepspeed.moe.layer.MoE`` with no glue: found (the outer layer only), checked against autograd of its
own experts and forward (top-1, top-2, Residual MoE), trained with the three monitors, and refused where its eval map
is random or couples tokens. It runs on CPU with ``ep_size=1`` and no process group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional test dependency: pip install -e .[libs]")

from deepspeed.moe.layer import MoE  # noqa: E402
from library_checks import assert_matches_autograd, initial_layer, logged_loads, train_with_monitors  # noqa: E402

from moe_lightning.adapters import find_moe_layers, scan_moe_layers  # noqa: E402

DIM, EXPERTS = 8, 4
# DeepSpeed's gate computes in float32 whatever the layer's dtype: its gates round differently for one token than
# for a batch, and its gate derivatives through the dispatch (sparse routes) and through the combine tensor differ
# in float32's last bits, so a float64 layer's σ_max agrees with autograd's to about 1e-8 relative, not to the
# 1e-9 asked of a float64 router. A wrong gate misses by 1e-2 and more.
FLOAT32_ROUTER = 1e-6


class Expert(nn.Module):
    """A GELU MLP returning ``(output, bias)`` as Megatron's ParallelMLP does; DeepSpeed keeps the first."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(DIM, 16), nn.Linear(16, DIM)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.down(F.gelu(self.up(x))), self.down.bias


def make_layer(**settings) -> MoE:
    # Settings under which the layer is a per-token function: no capacity drop, no sampled second expert.
    settings = {"k": 2, "top2_2nd_expert_sampling": False, "drop_tokens": False, "min_capacity": 1, **settings}
    layer = MoE(DIM, Expert(), num_experts=EXPERTS, **settings)
    # DeepSpeed deep-copies the one expert it is given into every slot, so its experts start equal and no routing
    # shows in the output; each is drawn anew so that a wrong gate would.
    for module in layer.deepspeed_moe.experts.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return layer


def own_expert(layer: MoE):
    """Expert ``e`` run by DeepSpeed's own ``Experts.forward``, on a dispatch buffer (1, E, n, D) holding the tokens
    in expert e's slots."""
    experts = layer.deepspeed_moe.experts

    def run(e: int):
        def expert(x_nD: Tensor) -> Tensor:
            buffer = torch.stack([x_nD if i == e else torch.zeros_like(x_nD) for i in range(EXPERTS)])
            return experts(buffer[None])[0, e]

        return expert

    return run


@pytest.mark.parametrize("settings", [{"k": 1}, {"k": 2}, {"k": 2, "drop_tokens": True, "eval_capacity_factor": 2.0}])
def test_found_with_no_glue_and_exact_against_autograd(settings):
    torch.manual_seed(0)
    layer = make_layer(**settings).double()
    views = find_moe_layers(nn.Sequential(nn.Linear(DIM, DIM), layer))
    assert [(v.name, v.num_experts) for v in views] == [("1", EXPERTS)]  # not also the inner MOELayer
    x_ND = torch.randn(10, DIM, dtype=torch.float64)
    assert_matches_autograd(layer, views, x_ND, own_expert(layer), rtol=FLOAT32_ROUTER)


def test_a_residual_moe_is_its_routed_experts_and_its_mlp_as_a_shared_expert():
    torch.manual_seed(0)
    layer = make_layer(k=1, use_residual=True).double()
    views = find_moe_layers(nn.Sequential(nn.Linear(DIM, DIM), layer))
    assert [(v.name, v.num_experts) for v in views] == [("1", EXPERTS), ("1.shared_experts", 1)]
    x_ND = torch.randn(10, DIM, dtype=torch.float64)

    def routed_output(x: Tensor) -> Tensor:  # DeepSpeed's MOELayer output times its coefficient's first share
        return layer.deepspeed_moe(x[None], None)[0] * layer.coefficient(x).softmax(-1)[:, :1]

    assert_matches_autograd(layer, views, x_ND, own_expert(layer), routed_output, rtol=FLOAT32_ROUTER)


REFUSED = [
    ({"k": 2, "top2_2nd_expert_sampling": True}, "top2_2nd_expert_sampling=True"),
    ({"k": 1, "min_capacity": 4}, "min_capacity=4"),
    ({"k": 1, "drop_tokens": True}, "drop_tokens=True with eval_capacity_factor=1.0"),
    ({"ep_size": 2}, "ep_size=2"),
]


@pytest.mark.parametrize(("settings", "named"), REFUSED, ids=[named for _, named in REFUSED])
def test_a_random_or_token_coupled_setting_is_refused_with_what_to_set(settings, named):
    scan = scan_moe_layers(nn.Sequential(make_layer(**settings)))
    assert scan.views == []
    (skipped,) = scan.skipped  # the outer layer only: the walk does not go on into its MOELayer
    assert (skipped.name, skipped.class_name) == ("0", "MoE")
    assert named in skipped.reason and "build it with" in skipped.reason and "\n" not in skipped.reason


def test_reading_a_gate_that_draws_random_numbers_leaves_the_random_state_alone():
    # Jitter and random token selection draw in training; RouterMonitor reads the gates after every training forward.
    layer = make_layer(k=1, noisy_gate_policy="Jitter").train()
    (view,) = find_moe_layers(layer)
    x_ND = torch.randn(6, DIM)
    state = torch.get_rng_state()
    view.gates(x_ND)
    after_view = torch.get_rng_state()
    layer.deepspeed_moe.gate(x_ND)  # the layer's own gate does draw
    assert torch.equal(after_view, state) and not torch.equal(torch.get_rng_state(), state)


def test_trains_with_the_three_monitors_and_logs_the_layers_own_loads(tmp_path):
    rows, inputs, _ = train_with_monitors(make_layer, DIM, tmp_path)
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"geometry/layer/jac_sigma_max/mean", "router/layer/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
    # The layer's own routing of step 0's tokens: its gate's expert counts (train mode), as shares of assignments.
    _, _, _, counts_E = initial_layer(make_layer).deepspeed_moe.gate(inputs[0].reshape(-1, DIM))
    assert torch.allclose(logged_loads(rows, "layer", 0, EXPERTS), counts_E.double() / counts_E.sum(), atol=1e-6)
