"""lucidrains' ``st-moe-pytorch`` with no glue: its ``MoE`` found (inside a ``SparseMoEBlock`` too), checked against
autograd of its own expert modules and forward, trained with the three monitors, and refused where its eval routing
is random or its experts are distributed."""

from __future__ import annotations

import pytest
import torch

st_moe_pytorch = pytest.importorskip(
    "st_moe_pytorch", reason="lucidrains' st-moe-pytorch is an optional test dependency: pip install -e .[libs]"
)

from library_checks import assert_matches_autograd, initial_layer, logged_loads, train_with_monitors  # noqa: E402

from moe_lightning.adapters import find_moe_layers, scan_moe_layers  # noqa: E402
from moe_lightning.geometry import verify_view  # noqa: E402

DIM, EXPERTS = 8, 4


def make_layer(**settings) -> torch.nn.Module:
    # Threshold 0 routes every token to its top-2 experts (a uniform draw below gate / eps, so always), and a capacity
    # factor of E keeps every token: the settings under which the layer is a per-token function. Its defaults draw
    # the second expert (threshold 0.2) and drop tokens over capacity.
    settings = {"threshold_train": 0.0, "threshold_eval": 0.0, "capacity_factor_train": float(EXPERTS),
                "capacity_factor_eval": float(EXPERTS), **settings}  # fmt: skip
    return st_moe_pytorch.MoE(dim=DIM, num_experts=EXPERTS, expert_hidden_mult=2, **settings)


@pytest.mark.parametrize("differentiable_topk", [False, True], ids=["topk", "differentiable-topk"])
def test_found_inside_its_block_with_no_glue_and_exact_against_autograd(differentiable_topk):
    torch.manual_seed(0)
    # Its default straight-through dispatch tensor backpropagates through the dispatch weights as if they were the
    # combine weights, so autograd of its forward is not the Jacobian of its output, which the views measure.
    layer = make_layer(straight_through_dispatch_tensor=False, differentiable_topk=differentiable_topk)
    block = st_moe_pytorch.SparseMoEBlock(layer, add_ff_before=True).double()
    views = find_moe_layers(torch.nn.Sequential(torch.nn.Linear(DIM, DIM), block))
    # The block (norm, MoE, residual, feedforwards) is not an MoE layer; the MoE inside it is.
    assert [(v.name, v.num_experts) for v in views] == [("1.moe", EXPERTS)]
    experts = block.moe.experts.experts
    x_ND = torch.randn(10, DIM, dtype=torch.float64)
    assert_matches_autograd(block.moe, views, x_ND, lambda e: experts[e])


@pytest.mark.parametrize(
    "settings",
    [{"gating_top_n": 3, "threshold_eval": (0.0, 0.0)}, {"threshold_eval": float("inf")}],
    ids=["top-3", "first-expert-only"],
)
def test_other_deterministic_settings_are_viewed_exactly(settings):
    torch.manual_seed(0)
    (view,) = find_moe_layers(make_layer(**settings).double())
    check = verify_view(view, torch.randn(10, DIM, dtype=torch.float64))
    assert check.passed and check.miss < 1e-12, check.message()


def test_a_capacity_that_drops_tokens_fails_the_per_token_check():
    torch.manual_seed(0)
    (view,) = find_moe_layers(make_layer(capacity_factor_eval=1.0).double())
    # 10 tokens, 20 assignments, 4 experts of capacity max(int(10 / 4), 4) = 4: some assignments are dropped.
    assert verify_view(view, torch.randn(10, DIM, dtype=torch.float64)).failed == "per-token"


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"threshold_eval": 0.2}, "threshold_eval=0.2 routes"),
        ({"gating_top_n": 3, "threshold_eval": (0.0, 0.3)}, "threshold_eval=(0, 0.3) routes"),
        ({"is_distributed": True}, "is_distributed=True"),
    ],
    ids=["random-second-expert", "random-third-expert", "distributed-experts"],
)
def test_refused_settings_name_what_to_change(settings, reason):
    scan = scan_moe_layers(torch.nn.Sequential(make_layer(**settings)))
    assert scan.views == []
    (skipped,) = scan.skipped
    assert skipped.class_name == "MoE" and reason in skipped.reason and "\n" not in skipped.reason


def test_trains_with_the_three_monitors_and_logs_the_layers_own_loads(tmp_path):
    rows, inputs, _ = train_with_monitors(make_layer, DIM, tmp_path)
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"geometry/layer/jac_sigma_max/mean", "router/layer/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
    # The layer's own routing of step 0's tokens (its dispatch tensor, train mode), as shares of the assignments.
    dispatch, _, _, _ = initial_layer(make_layer).gate(inputs[0])
    counts_E = dispatch.detach().sum(dim=(0, 1, 3)).double()
    assert torch.allclose(logged_loads(rows, "layer", 0, EXPERTS), counts_E / counts_E.sum(), atol=1e-6)
