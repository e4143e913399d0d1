"""torchtitan's MoE layer (``torchtitan.models.moe.MoE``) with no glue: found, checked against autograd of its own
grouped experts and forward, trained with the three monitors, and refused with its default ``score_before_experts``.

Its router counts tokens per expert with ``torch.histc`` on int64 expert indices, which torch implements on CUDA
only (https://github.com/pytorch/pytorch/issues/74236: ``"histogram_cpu" not implemented for 'Long'``), so on CPU
every forward of the layer fails. These tests stand in a ``histc`` that counts the same indices as floats (exact:
the indices are small integers) and returns them in the input's dtype, as CUDA's does; everything else is the
library's own code. Its default grouped experts (``use_grouped_mm=True``) need a GPU too (a Triton kernel pads the
groups), so the tests use its for-loop experts.
"""

from __future__ import annotations

import pytest
import torch

torchtitan_moe = pytest.importorskip(
    "torchtitan.models.moe", reason="torchtitan is an optional test dependency: pip install -e .[libs]"
)

from library_checks import assert_matches_autograd, initial_layer, logged_loads, train_with_monitors  # noqa: E402

from moe_lightning.adapters import find_moe_layers, scan_moe_layers  # noqa: E402
from moe_lightning.geometry import verify_view  # noqa: E402

DIM, EXPERTS, TOP_K = 8, 4, 2
BIAS_FROM, BIAS_TO = 0.3, -0.2  # a selection bias falling over the experts, so that it changes the routing


@pytest.fixture(autouse=True)
def histc_of_integers_on_cpu(monkeypatch):
    histc = torch.histc

    def counted_as_floats(input, *args, **kwargs):
        if input.is_floating_point() or input.device.type != "cpu":
            return histc(input, *args, **kwargs)
        return histc(input.float(), *args, **kwargs).to(input.dtype)

    monkeypatch.setattr(torch, "histc", counted_as_floats)


def make_layer(**settings) -> torch.nn.Module:
    settings = {"num_experts": EXPERTS, "top_k": TOP_K, "num_shared_experts": 1, "score_func": "softmax",
                "score_before_experts": False, "use_grouped_mm": False, **settings}  # fmt: skip
    layer = torchtitan_moe.MoE(torchtitan_moe.MoEArgs(**settings), dim=DIM, hidden_dim=16)
    with torch.no_grad():  # its weights are torch.empty until init_weights; a nonzero selection bias to follow
        layer.init_weights(init_std=0.5, buffer_device=torch.device("cpu"))
        if layer.expert_bias is not None:
            layer.expert_bias.copy_(torch.linspace(BIAS_FROM, BIAS_TO, layer.experts.num_experts))
    return layer


def test_found_with_no_glue_and_exact_against_autograd():
    # sigmoid scores, a gate bias, node-limited routing (top-2 of the 3 experts of the best of 2 groups), route_norm
    # and route_scale: all in the router
    settings = {"num_experts": 6, "score_func": "sigmoid", "gate_bias": True, "route_norm": True,
                "route_scale": 2.5, "num_expert_groups": 2, "num_limited_groups": 1}  # fmt: skip
    torch.manual_seed(0)
    layer = make_layer(**settings).double()
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), layer)
    views = find_moe_layers(model)
    assert [(v.name, v.num_experts) for v in views] == [("1", 6), ("1.shared_experts", 1)]
    x_ND = torch.randn(10, DIM, dtype=torch.float64)

    def own_expert(e: int):
        # the layer's own GroupedExperts forward, every token given to expert e
        counts_E = torch.zeros(6, dtype=torch.long)
        return lambda x: layer.experts(x, counts_E.index_fill(0, torch.tensor(e), x.shape[0]))

    def own_routed_output(x):
        return layer(x[None])[0] - layer.shared_experts(x)

    # its router scores and its weighted sum of the experts run in float32 whatever the layer's dtype
    assert_matches_autograd(layer, views, x_ND, own_expert, own_routed_output, float32_inside=True)
    # in float32, what training runs, the view passes the check that the monitors run
    layer32 = make_layer(**settings)
    check = verify_view(find_moe_layers(layer32), x_ND.float())
    assert check.passed and check.miss < 1e-6, check.message()


def test_score_before_experts_and_forced_balance_are_refused_with_the_setting_to_change():
    model = torch.nn.Sequential(make_layer(score_before_experts=True), make_layer(_debug_force_load_balance=True))
    scan = scan_moe_layers(model)
    assert scan.views == []
    reasons = [skipped.reason for skipped in scan.skipped]
    assert [skipped.class_name for skipped in scan.skipped] == ["MoE", "MoE"]
    assert "score_before_experts=True" in reasons[0] and "score_before_experts=False" in reasons[0]
    assert "_debug_force_load_balance=False" in reasons[1]


def test_trains_with_the_three_monitors_and_logs_the_layers_own_loads(tmp_path):
    rows, inputs, state = train_with_monitors(make_layer, DIM, tmp_path)
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"geometry/layer/jac_sigma_max/mean", "router/layer/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
    # The layer's own routing of step 0's tokens (its router's counts, with its selection bias), as shares.
    layer = initial_layer(make_layer)
    _, _, counts_E = layer.router(inputs[0].reshape(-1, DIM), layer.expert_bias)
    assert torch.allclose(logged_loads(rows, "layer", 0, EXPERTS), counts_E.double() / counts_E.sum(), atol=1e-6)
    # RouterMonitor reads the selection bias the layer keeps (no optimizer hook of torchtitan's moves it here).
    (bias_range,) = {float(r["router/layer/bias_range"]) for r in rows if r.get("router/layer/bias_range")}
    assert abs(bias_range - (BIAS_FROM - BIAS_TO)) < 1e-6
    # Its token counter (a buffer its forward adds to) holds the training forwards alone: TOP_K per token per step.
    tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    assert float(state["layer.tokens_per_expert"].sum()) == TOP_K * tokens
