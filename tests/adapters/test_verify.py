"""The view check (moe_lightning.geometry.verify_view): a right view passes; random routing, token-coupled routing
and a wrong hand-written view are refused, each by the check that catches it, with the size of the miss; the check
changes nothing a training run sees."""

import math

import pytest
import torch
from moe_layers import RandomSecondExpertMoE, SlotMoE
from torch import nn

from moe_lightning.adapters import CallableView, find_moe_layers
from moe_lightning.adapters.verify import check_views
from moe_lightning.geometry import verify_view
from moe_lightning.nn.layer import MoEConfig, MoELayer


def _native(shared: int = 0) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(dim=8, expert_hidden=16, num_experts=4, top_k=2, num_shared_experts=shared))


def _hand_view(layer: nn.Module, gates, num_experts: int = 4) -> CallableView:
    """A hand-written view of ``layer``: the given gates, and its experts."""
    if isinstance(layer, MoELayer):
        experts = [lambda x, e=e: layer.expert_fn(e, x) for e in range(num_experts)]
    else:
        experts = [layer.experts[e] for e in range(num_experts)]
    return CallableView(name="moe", module=layer, gates_fn=gates, expert_fns=experts)


@pytest.mark.parametrize("dtype", [torch.float64, None])
def test_a_right_view_passes_with_routed_and_shared_experts_together(dtype):
    layer = _native(shared=1)
    views = find_moe_layers(layer)
    x = torch.randn(40, 8)
    check = verify_view(views, x, dtype)
    assert check.passed and check.message() == "" and check.miss <= check.tolerance == 1e-4
    # the routed view alone misses the shared expert's part of the output
    alone = verify_view(views[0], x, dtype)
    assert alone.failed == "reconstruction" and alone.miss > 1e-2
    assert "'' fails the reconstruction check (relative miss" in alone.message()


def test_a_filtered_view_is_checked_with_its_layers_other_views():
    layer = _native(shared=1)
    routed = find_moe_layers(layer)[0]
    assert check_views([routed], {routed.name: torch.randn(32, 8)}, torch.float64)[routed.name].passed


def test_swapped_gates_fail_reconstruction():
    layer = _native()
    right = _hand_view(layer, lambda x: layer.router.gates(x))
    wrong = _hand_view(layer, lambda x: layer.router.gates(x)[:, [1, 0, 2, 3]])
    x = torch.randn(48, 8)
    assert verify_view(right, x, torch.float64).passed
    check = verify_view(wrong, x, torch.float64)
    assert check.failed == "reconstruction" and check.miss > 1e-2
    assert check.message().startswith(
        f"the view of 'moe' fails the reconstruction check (relative miss {check.miss:.3g}"
    )


def test_random_second_expert_fails_determinism_and_the_rng_is_untouched():
    torch.manual_seed(0)
    layer = RandomSecondExpertMoE()
    view, x = _hand_view(layer, layer.view_gates), torch.randn(64, 8)
    state = torch.get_rng_state()
    check = verify_view(view, x, torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert check.failed == "determinism" and check.miss > 1e-2
    assert "two forwards of the layer on the same tokens disagree" in check.message()


def test_token_coupled_slots_fail_the_per_token_check():
    torch.manual_seed(0)
    layer = SlotMoE()
    view = _hand_view(layer, layer.view_gates)
    check = verify_view(view, torch.randn(64, 8), torch.float64)
    assert check.failed == "per-token" and check.miss > 1e-2
    assert "the per-token Jacobian is not defined for it" in check.message()


def test_a_view_whose_module_is_the_router_is_refused_with_the_reason():
    layer = _native()
    view = CallableView(
        name="moe",
        module=layer.router,
        gates_fn=layer.router.gates,
        expert_fns=[lambda x, e=e: layer.expert_fn(e, x) for e in range(4)],
    )
    check = verify_view(view, torch.randn(16, 8), torch.float64)
    assert math.isnan(check.miss) and "a view's module must be the MoE block" in check.message()


def test_the_check_leaves_weights_buffers_and_modes_as_they_were():
    layer = _native().train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert verify_view(find_moe_layers(layer), torch.randn(32, 8), torch.float64).passed
    assert layer.training and all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_the_pretrained_probe_reports_only_the_views_that_pass():
    from moe_lightning.commands.probe.run import verified

    right, wrong = _native(), _native()
    views = [*find_moe_layers(right), _hand_view(wrong, lambda x: wrong.router.gates(x)[:, [1, 0, 2, 3]])]
    x = torch.randn(32, 8)
    with pytest.warns(UserWarning, match=r"^probe: the view of 'moe' fails the reconstruction check \(relative miss"):
        assert verified(views, {"": x, "moe": x}, torch.float64) == views[:1]
    with pytest.raises(ValueError, match="^probe: no MoE layer passed the view check"):
        verified(views[1:], {"moe": x}, torch.float64)
