"""lucidrains' ``mixture-of-experts`` (PyPI ``mixture-of-experts``) with no glue: found, checked against autograd of
its own experts and forward, trained with the three monitors, and refused with its default random second expert."""

from __future__ import annotations

import pytest
import torch

mixture_of_experts = pytest.importorskip(
    "mixture_of_experts", reason="lucidrains' mixture-of-experts is an optional test dependency: pip install -e .[libs]"
)

from library_checks import assert_matches_autograd, initial_layer, logged_loads, train_with_monitors  # noqa: E402

from moe_lightning.adapters import find_moe_layers, scan_moe_layers  # noqa: E402

DIM, EXPERTS = 8, 4


def make_layer(**settings) -> torch.nn.Module:
    # A capacity of every token (capacity_factor = E) and a deterministic second expert: the settings under which
    # the layer is a per-token function (its defaults drop tokens over capacity and draw the second expert).
    settings = {"second_policy_train": "all", "second_policy_eval": "all", "capacity_factor_train": float(EXPERTS),
                "capacity_factor_eval": float(EXPERTS), **settings}  # fmt: skip
    return mixture_of_experts.MoE(dim=DIM, num_experts=EXPERTS, hidden_dim=16, **settings)


def test_found_with_no_glue_and_exact_against_autograd():
    torch.manual_seed(0)
    layer = make_layer().double()
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), layer)
    views = find_moe_layers(model)
    assert [(v.name, v.num_experts) for v in views] == [("1", EXPERTS)]
    x_ND = torch.randn(10, DIM, dtype=torch.float64)
    experts = layer.experts

    def own_expert(e: int):
        return lambda x: experts.act(x @ experts.w1[e]) @ experts.w2[e]

    assert_matches_autograd(layer, views, x_ND, own_expert)


def test_the_default_random_second_expert_is_refused_with_the_setting_to_change():
    scan = scan_moe_layers(torch.nn.Sequential(make_layer(second_policy_eval="random")))
    assert scan.views == []
    (skipped,) = scan.skipped
    assert skipped.class_name == "MoE" and "second_policy_eval='random'" in skipped.reason


def test_trains_with_the_three_monitors_and_logs_the_layers_own_loads(tmp_path):
    rows, inputs, _ = train_with_monitors(make_layer, DIM, tmp_path)
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"geometry/layer/jac_sigma_max/mean", "router/layer/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
    # The layer's own routing of step 0's tokens (its dispatch tensor, train mode), as shares of the assignments.
    dispatch, _, _ = initial_layer(make_layer).gate(inputs[0])
    counts_E = dispatch.sum(dim=(0, 1, 3)).double()
    assert torch.allclose(logged_loads(rows, "layer", 0, EXPERTS), counts_E / counts_E.sum(), atol=1e-6)
