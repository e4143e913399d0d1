"""nanoMoE's ``MOELayer`` (its copy in tests/moe_layers.py; nanoMoE is not on PyPI) with no glue: found, checked
against autograd of its own experts' forward and its layer forward, with and without expert biases, trained with the
three monitors, and refused with noisy top-k or with the losses its router adds to a global manager."""

from __future__ import annotations

import pytest
import torch
from library_checks import assert_matches_autograd, initial_layer, logged_loads, train_with_monitors
from moe_layers import MOELayer, NanoMoEConfig

from moe_lightning.adapters import find_moe_layers, scan_moe_layers

DIM, EXPERTS, TOP_K = 8, 4, 2


def make_layer(**settings) -> MOELayer:
    # A capacity factor of n_exp / top_k gives each expert room for every token: the layer is then a per-token
    # function (its defaults, 1.25 in training and 2.0 in eval, drop tokens over capacity).
    capacity = EXPERTS / TOP_K
    config = {"n_embd": DIM, "n_exp": EXPERTS, "top_k": TOP_K, "train_capacity": capacity, "eval_capacity": capacity}
    return MOELayer(NanoMoEConfig(**{**config, **settings}))


@pytest.mark.parametrize("bias", [True, False], ids=["expert-biases", "no-biases"])
def test_found_with_no_glue_and_exact_against_autograd(bias):
    torch.manual_seed(0)
    layer = make_layer(bias=bias).double()
    views = find_moe_layers(torch.nn.Sequential(torch.nn.Linear(DIM, DIM), layer))
    assert [(v.name, v.num_experts) for v in views] == [("1", EXPERTS)]
    x_ND = torch.randn(10, DIM, dtype=torch.float64)

    def own_expert(e: int):
        # nanoMoE's own experts' forward (bmm over the expert batches), the tokens in expert e's batch.
        def run(x):
            batches_ECD = torch.zeros(EXPERTS, *x.shape, dtype=x.dtype).index_copy(0, torch.tensor([e]), x[None])
            return layer.experts(batches_ECD)[e]

        return run

    assert_matches_autograd(layer, views, x_ND, own_expert)
    # The closed-form expert Jacobian (input bias inside the activation) against autograd of the experts' forward.
    for e in range(EXPERTS):
        expected = torch.stack(
            [torch.autograd.functional.jacobian(lambda t: own_expert(e)(t[None])[0], x) for x in x_ND]
        )
        assert torch.allclose(views[0].expert_jacobian(e, x_ND), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"use_noisy_top_k": True}, "use_noisy_top_k=True adds"),
        ({"use_aux_loss": True}, "use_aux_loss=True, use_router_z_loss=False: every router call"),
        ({"use_router_z_loss": True}, "use_aux_loss=False, use_router_z_loss=True: every router call"),
    ],
    ids=["noisy-top-k", "aux-loss", "router-z-loss"],
)
def test_refused_settings_name_what_to_change(settings, reason):
    scan = scan_moe_layers(torch.nn.Sequential(make_layer(**settings)))
    assert scan.views == []
    (skipped,) = scan.skipped
    assert skipped.class_name == "MOELayer" and reason in skipped.reason and "\n" not in skipped.reason


def test_trains_with_the_three_monitors_and_logs_the_layers_own_loads(tmp_path):
    rows, inputs, _ = train_with_monitors(make_layer, DIM, tmp_path)
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"geometry/layer/jac_sigma_max/mean", "router/layer/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
    # The layer's own routing of step 0's tokens (its router's used capacity per expert, train mode), as shares.
    used_capacity_E, _, _ = initial_layer(make_layer).router(inputs[0])
    counts_E = used_capacity_E.double()
    assert torch.allclose(logged_loads(rows, "layer", 0, EXPERTS), counts_E / counts_E.sum(), atol=1e-6)
